//! What a module costs by the language it is written in: its size, its
//! compile time (cold, and loaded from the compile cache as a restarted node
//! or `wasmrpc run` loads it), and a request's instantiate-and-call time
//! in-process (a fresh sandbox per call, as a node runs it), each against the
//! Rust `fib` measured in the same run. The input is the smallest each
//! module takes, so the figures are the sandbox's and the language runtime's
//! start-up.
//!
//! `cargo bench --bench languages` (builds the guests first; needs the
//! toolchains `guests/build-lang` names).

use std::time::Instant;

#[path = "../../tests/integration/support/guests.rs"]
#[allow(dead_code)]
mod guests;

use wasmrpc::runtime::{Limits, Module, Runtime, RuntimeConfig, Wasm};

const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let modules = [
        (
            "Rust fib (wasip2 component)",
            guests::wasm("fib"),
            &b"1"[..],
        ),
        ("C fib (WASI preview 1 program)", guests::lang("cfib"), b"1"),
        ("Python fib (componentize-py)", guests::lang("pyfib"), b"1"),
        (
            "JavaScript stats (componentize-js)",
            guests::lang("jsstats"),
            b"[1]",
        ),
    ];
    let cache = tempfile::tempdir()?;
    let runtime = Runtime::new(&RuntimeConfig::new(1, Some(cache.path().to_owned())))?;
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "{:<36} {:>10} {:>11} {:>10} {:>14} {:>8}",
        "module", "size KiB", "compile ms", "cached ms", "µs per call", "ratio"
    );
    let mut baseline = None;
    for (name, path, input) in modules {
        let bytes = std::fs::read(&path)?;
        let size = bytes.len() as f64 / 1024.0;
        let started = Instant::now();
        let module = runtime.compile(&Wasm::new(bytes.clone()), &Limits::DEFAULT)?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        assert!(!module.from_cache(), "{name} was cached before the run");
        let started = Instant::now();
        let cached = runtime.compile(&Wasm::new(bytes), &Limits::DEFAULT)?;
        let cached_ms = started.elapsed().as_secs_f64() * 1e3;
        assert!(cached.from_cache(), "{name} was not cached");
        let micros = per_call(&tokio, &module, input)?;
        let base = *baseline.get_or_insert(micros);
        println!(
            "{name:<36} {size:>10.0} {compile_ms:>11.0} {cached_ms:>10.0} {micros:>14.1} {:>7.1}x",
            micros / base
        );
    }
    Ok(())
}

/// The median over rounds of the mean time of a call, each in a fresh instance.
fn per_call(tokio: &tokio::runtime::Runtime, module: &Module, input: &[u8]) -> anyhow::Result<f64> {
    // A round lasts about half a second, whatever a call costs.
    let started = Instant::now();
    tokio.block_on(module.call(input, None))?;
    let calls = (0.5 / started.elapsed().as_secs_f64()).clamp(10.0, 5_000.0) as usize;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for _ in 0..calls {
            tokio.block_on(module.call(input, None))?;
        }
        rounds.push(started.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[ROUNDS / 2])
}
