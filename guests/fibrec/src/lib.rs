//! A CPU-bound test module: the n-th Fibonacci number by naive recursion,
//! so fib(25) makes some 250,000 calls. The benchmarks compare it with the
//! same function compiled natively (`host/examples/native_peer.rs`), to
//! price what wasm costs on code that only computes.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct FibRec;

impl Guest for FibRec {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let n: u32 = std::str::from_utf8(&input)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .filter(|&n| n <= MAX_N)
            .ok_or_else(|| CallError::InvalidInput(format!("expected n from 0 to {MAX_N}")))?;
        Ok(fib(n).to_string().into_bytes())
    }
}

export!(FibRec);

/// Beyond it, a call takes seconds.
const MAX_N: u32 = 35;

/// The same function as the native peer's, line for line.
fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}
