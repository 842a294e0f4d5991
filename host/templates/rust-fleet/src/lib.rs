//! The wasmrpc module `{{name}}`, which calls other modules: for each word of
//! the request body it calls `fib`, all at once, and replies with their
//! answers, space-separated (`10 20` gives `55 6765`). It may call what
//! `{{name}}.toml` names in `calls`, and nothing else.

wit_bindgen::generate!({ path: "wit", world: "fleet-module" });

use wasmrpc::compute::fleet;

struct Module;

impl Guest for Module {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let text = std::str::from_utf8(&input)
            .map_err(|_| CallError::InvalidInput("expected UTF-8 text".into()))?;
        let calls: Vec<(String, Vec<u8>)> = text
            .split_whitespace()
            .map(|word| ("fib".to_owned(), word.as_bytes().to_vec()))
            .collect();
        let mut answers = Vec::with_capacity(calls.len());
        for ((_, word), result) in calls.iter().zip(fleet::call_all(&calls)) {
            let reply = result.map_err(|error| {
                let word = String::from_utf8_lossy(word);
                CallError::Failed(format!("fib {word}: {}: {}", error.kind, error.message))
            })?;
            answers.push(String::from_utf8_lossy(&reply).into_owned());
        }
        Ok(answers.join(" ").into_bytes())
    }
}

export!(Module);
