//! The wasmrpc module `{{name}}`: the request body in, the reply body out.

wit_bindgen::generate!({ path: "wit", world: "module" });

struct Module;

impl Guest for Module {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let name = std::str::from_utf8(&input)
            .map_err(|_| CallError::InvalidInput("expected UTF-8 text".into()))?
            .trim();
        Ok(format!("hello, {name}").into_bytes())
    }
}

export!(Module);
