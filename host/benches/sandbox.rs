//! What a fresh sandbox per request costs, and what WASI adds to it.
//!
//! Runs the fib guest through `Module::call` (new store, pooled instance,
//! call, teardown) built two ways from the same source: for wasm32-wasip2, as
//! the project ships it, and for wasm32-unknown-unknown encoded as a
//! component with no imports at all. The import-free fib(0) is the baseline:
//! every other row is reported as a ratio to it, measured in the same run.
//!
//! Last, what time limits cost a guest that computes: the naive recursive
//! `fibrec(25)` with epoch interruption on (as every node runs it) against
//! the same module compiled by a runtime without it.
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
    let fibrec = std::fs::read(
        guests::build_for("wasm32-wasip2")
            .map_err(anyhow::Error::msg)?
            .join("fibrec.wasm"),
    )?;
    let unlimited = Runtime::new(&RuntimeConfig {
        time_limits: false,
        ..RuntimeConfig::new(1, None)
    })?;
    let limited_fibrec = runtime.compile(&Wasm::new(fibrec.clone()), &Limits::DEFAULT)?;
    let unlimited_fibrec = unlimited.compile(&Wasm::new(fibrec), &Limits::DEFAULT)?;
    let fibrec_calls = (calls / 100).max(5);
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

    // Interleaved as above: with time limits, then without, each round.
    let pair = [&limited_fibrec, &unlimited_fibrec];
    let mut batches = [Vec::new(), Vec::new()];
    for _ in 0..BATCHES {
        for (module, batches) in pair.iter().zip(&mut batches) {
            let started = Instant::now();
            for _ in 0..fibrec_calls {
                tokio.block_on(module.call(b"25", None))?;
            }
            batches.push(started.elapsed().as_secs_f64() * 1e6 / fibrec_calls as f64);
        }
    }
    let [limited, unlimited] = batches.map(|mut batches| {
        batches.sort_by(f64::total_cmp);
        batches[BATCHES / 2]
    });
    println!("{fibrec_calls} calls of naive recursive fibrec(25) per batch");
    println!(
        "with time limits       {limited:>8.1} µs/call  {:>5.2}x without",
        limited / unlimited
    );
    println!("without time limits    {unlimited:>8.1} µs/call");
    Ok(())
}
