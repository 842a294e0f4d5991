//! A test module that keeps the CPU busy for as long as it is asked: input is
//! a number of milliseconds. The tests use it to have a request in flight
//! (during shutdown, say) for a known time.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Spin;

impl Guest for Spin {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let ms: u64 = std::str::from_utf8(&input)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| CallError::InvalidInput("expected a number of milliseconds".into()))?;
        let started = std::time::Instant::now();
        let mut spins = 0u64;
        while started.elapsed().as_millis() < u128::from(ms) {
            spins = std::hint::black_box(spins + 1);
        }
        Ok(format!("spun for {ms} ms").into_bytes())
    }
}

export!(Spin);
