//! What a fresh sandbox per request costs, and what WASI adds to it.
//!
//! Runs the fib guest through `Module::call` (new store, pooled instance,
//! call, teardown) built two ways from the same source: for wasm32-wasip2, as
//! the project ships it, and for wasm32-unknown-unknown encoded as a
//! component with no imports at all. The import-free fib(0) is the baseline:
//! every other row is reported as a ratio to it, measured in the same run.
//!
//! `cargo bench --bench sandbox` (`SANDBOX_BENCH_CALLS` sets calls per batch).

use std::time::Instant;

#[path = "../../tests/integration/support/guests.rs"]
#[allow(dead_code)]
mod guests;

use wasmrpc::runtime::{Limits, Module, Runtime, RuntimeConfig, Wasm};

const BATCHES: usize = 7;

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::var("SANDBOX_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let wasip2 = std::fs::read(
        guests::build_for("wasm32-wasip2")
            .map_err(anyhow::Error::msg)?
            .join("fib.wasm"),
    )?;
    let core = std::fs::read(
        guests::build_for("wasm32-unknown-unknown")
            .map_err(anyhow::Error::msg)?
            .join("fib.wasm"),
    )?;
    let no_imports = wit_component::ComponentEncoder::default()
        .module(&core)?
        .validate(true)
        .encode()?;

    let runtime = Runtime::new(&RuntimeConfig::new(1, None))?;
    let wasip2 = runtime.compile(&Wasm::new(wasip2), &Limits::DEFAULT)?;
    let no_imports = runtime.compile(&Wasm::new(no_imports), &Limits::DEFAULT)?;

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rows: [(&str, &Module, &[u8]); 5] = [
        ("no imports, fib(0)", &no_imports, b"0"),
        ("wasip2,     fib(0)", &wasip2, b"0"),
        ("no imports, fib(30)", &no_imports, b"30"),
        ("wasip2,     fib(30)", &wasip2, b"30"),
        ("wasip2,     fib(1000)", &wasip2, b"1000"),
    ];
    println!(
        "{calls} calls per batch, one fresh instance per call; median of {BATCHES} rounds, rows interleaved"
    );
    // Rounds run every row in turn, so drift in the machine's speed lands on
    // all rows alike.
    let mut batches = vec![Vec::with_capacity(BATCHES); rows.len()];
    for _ in 0..BATCHES {
        for ((_, module, input), batches) in rows.iter().zip(&mut batches) {
            let started = Instant::now();
            for _ in 0..calls {
                tokio.block_on(module.call(input, None))?;
            }
            batches.push(started.elapsed().as_secs_f64() * 1e6 / calls as f64);
        }
    }
    let medians: Vec<f64> = batches
        .iter_mut()
        .map(|batches| {
            batches.sort_by(f64::total_cmp);
            batches[BATCHES / 2]
        })
        .collect();
    for ((name, ..), micros) in rows.iter().zip(&medians) {
        println!(
            "{name:<22} {micros:>8.1} µs/call  {:>5.2}x baseline",
            micros / medians[0]
        );
    }
    Ok(())
}
