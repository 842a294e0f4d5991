// A wasmrpc module in JavaScript: a JSON array of numbers in, their summary
// out as JSON. Built into a component with componentize-js (guests/build-lang).

const decoder = new TextDecoder();
const encoder = new TextEncoder();

// A thrown `{ tag, val }` becomes the `err` of the world's `result`.
function invalid(message) {
  return { tag: "invalid-input", val: message };
}

export function call(input) {
  let numbers;
  try {
    numbers = JSON.parse(decoder.decode(input));
  } catch (error) {
    throw invalid(`expected a JSON array of numbers: ${error.message}`);
  }
  if (!Array.isArray(numbers) || numbers.length === 0 || !numbers.every(Number.isFinite)) {
    throw invalid("expected a non-empty JSON array of numbers");
  }
  const sum = numbers.reduce((a, b) => a + b, 0);
  const summary = {
    count: numbers.length,
    sum,
    mean: sum / numbers.length,
    min: Math.min(...numbers),
    max: Math.max(...numbers),
  };
  return encoder.encode(JSON.stringify(summary));
}
