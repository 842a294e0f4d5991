// The wasmrpc module {{name}}: the request body in, the reply body out.
// Throw { tag: "invalid-input", val: message } to answer bad_request.

const decoder = new TextDecoder("utf-8", { fatal: true });

export function call(input) {
  let name;
  try {
    name = decoder.decode(input).trim();
  } catch {
    throw { tag: "invalid-input", val: "expected UTF-8 text" };
  }
  return new TextEncoder().encode(`hello, ${name}`);
}
