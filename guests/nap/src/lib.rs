//! A test module that sleeps for as long as it is asked (input: a number of
//! milliseconds) in a WASI call, holding no CPU: the tests use it to check
//! that a module whose requests wait cannot keep other modules from running.

use std::time::Duration;

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Nap;

impl Guest for Nap {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let ms: u64 = std::str::from_utf8(&input)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| CallError::InvalidInput("expected a number of milliseconds".into()))?;
        std::thread::sleep(Duration::from_millis(ms));
        Ok(format!("slept for {ms} ms").into_bytes())
    }
}

export!(Nap);
