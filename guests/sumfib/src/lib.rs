//! A module that calls the fleet: the sum of F(n) for every n in a range,
//! each F(n) computed by the `fib` module, all at once.
//!
//! The input is `a..b` (inclusive, as decimal text); the output is the sum in
//! decimal. `1..30` gives 2178308. It needs a manifest that lets it call
//! `fib` (`calls = ["fib"]` in `sumfib.toml`).

use num_bigint::BigUint;

use wasmrpc::compute::fleet;

wit_bindgen::generate!({ path: "../../wit", world: "fleet-module" });

/// The most numbers one input may name: one call each, and a node lets one
/// request cause 256 calls in all by default (`--max-calls-per-request`).
const MAX_RANGE: u32 = 256;

/// Calls per `call-all`: within a node's default cap.
const BATCH: usize = 64;

struct SumFib;

impl Guest for SumFib {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let (first, last) = parse(&input).map_err(CallError::InvalidInput)?;
        let calls: Vec<(String, Vec<u8>)> = (first..=last)
            .map(|n| ("fib".to_owned(), n.to_string().into_bytes()))
            .collect();
        let mut sum = BigUint::ZERO;
        for (at, batch) in calls.chunks(BATCH).enumerate() {
            let from = first + (at * BATCH) as u32;
            for (n, result) in (from..).zip(fleet::call_all(batch)) {
                let reply = result.map_err(|error| {
                    CallError::Failed(format!("fib {n}: {}: {}", error.kind, error.message))
                })?;
                let text = std::str::from_utf8(&reply)
                    .map_err(|_| CallError::Failed(format!("fib {n}: the reply is not text")))?;
                let value: BigUint = text.trim().parse().map_err(|_| {
                    CallError::Failed(format!("fib {n}: the reply is not a number: {text:?}"))
                })?;
                sum += value;
            }
        }
        Ok(sum.to_string().into_bytes())
    }
}

export!(SumFib);

/// Reads `a..b`, or says why the input is not such a range.
fn parse(input: &[u8]) -> Result<(u32, u32), String> {
    let text = std::str::from_utf8(input)
        .map_err(|_| "expected a range a..b as text".to_string())?
        .trim_ascii();
    let shown: String = text.chars().take(40).collect();
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("expected a range a..b, got {shown:?}"))?;
    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("expected a range of whole numbers a..b, got {shown:?}"))
    };
    let (a, b) = (number(a)?, number(b)?);
    if a > b {
        return Err(format!("the range {a}..{b} is empty"));
    }
    if b - a >= MAX_RANGE {
        return Err(format!("the range names more than {MAX_RANGE} numbers"));
    }
    Ok((a, b))
}
