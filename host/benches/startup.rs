//! How long a node takes to start with 200 modules, with a cold compile
//! cache and with a warm one.
//!
//! Two figures for each: loading the modules (read, hash, compile or load
//! from the cache; no broker), and the whole start of a node until it serves
//! (the same, plus connecting and declaring and consuming 200 quorum queues
//! on the broker at `AMQP_URL`). The cold load is the baseline of its row pair; the warm one is
//! reported as a ratio to it, measured in the same run.
//!
//! `cargo bench --bench startup` (`STARTUP_BENCH_MODULES` changes the count).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
#[path = "../../tests/integration/support/guests.rs"]
#[allow(dead_code)]
mod guests;

use wasmrpc::node::{Node, NodeConfig, State};
use wasmrpc::registry::{Loader, Registry};
use wasmrpc::runtime::{Limits, Runtime, RuntimeConfig};
use wasmrpc::wire::Topology;

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::var("STARTUP_BENCH_MODULES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| wasmrpc::amqp::DEFAULT_URL.to_owned());
    let fib = std::fs::read(
        guests::build_for("wasm32-wasip2")
            .map_err(anyhow::Error::msg)?
            .join("fib.wasm"),
    )?;

    // 200 distinct builds of fib: a custom section makes each one's bytes,
    // and so its cache entry, its own.
    let modules = tempfile::tempdir()?;
    for i in 0..count {
        std::fs::write(
            modules.path().join(format!("fib{i}.wasm")),
            guests::variant(&fib, &i.to_string()),
        )?;
    }
    let tokio = tokio::runtime::Runtime::new()?;
    println!("{count} modules of {} KiB each", fib.len() / 1024);

    let cache = tempfile::tempdir()?;
    let cold = tokio.block_on(load(modules.path(), cache.path()))?;
    let warm = tokio.block_on(load(modules.path(), cache.path()))?;
    println!(
        "module loading, cold cache: {:>8.1} ms (baseline)",
        ms(cold)
    );
    println!(
        "module loading, warm cache: {:>8.1} ms ({:.3}x)",
        ms(warm),
        warm.as_secs_f64() / cold.as_secs_f64()
    );

    let exchange = format!("wasmrpc-bench-{}", std::process::id());
    let start = |cache: &Path| {
        let mut config = NodeConfig::new(url.parse().map_err(anyhow::Error::msg)?, modules.path());
        config.exchange = exchange.clone();
        config.cache_dir = Some(cache.to_owned());
        tokio.block_on(async {
            let started = Instant::now();
            let node = Node::start(config).await?;
            let mut state = node.state();
            let stop = tokio_util::sync::CancellationToken::new();
            let serving = tokio::spawn(node.serve(stop.clone().cancelled_owned()));
            let ready = state
                .wait_for(|state| matches!(state, State::Serving { .. }))
                .await
                .map(|_| started.elapsed());
            stop.cancel();
            serving.await??;
            anyhow::Ok(ready?)
        })
    };
    let cold_cache = tempfile::tempdir()?;
    let cold = start(cold_cache.path())?;
    let warm = start(cold_cache.path())?;
    println!(
        "node start, cold cache:     {:>8.1} ms (baseline)",
        ms(cold)
    );
    println!(
        "node start, warm cache:     {:>8.1} ms ({:.3}x)",
        ms(warm),
        warm.as_secs_f64() / cold.as_secs_f64()
    );
    tokio.block_on(delete(&url, &Topology::new(&exchange), count))
}

async fn load(modules: &Path, cache: &Path) -> anyhow::Result<Duration> {
    let runtime = Runtime::new(&RuntimeConfig::new(2, Some(cache.to_owned())))?;
    let registry = Arc::new(Registry::default());
    let loader = Arc::new(Loader::new(
        runtime,
        modules,
        Limits::DEFAULT,
        NodeConfig::DEFAULT_MAX_MESSAGE,
        registry.clone(),
    ));
    let started = Instant::now();
    loader.load_all().await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(!registry.names().is_empty(), "no module loaded");
    Ok(elapsed)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

async fn delete(url: &str, topology: &Topology, count: usize) -> anyhow::Result<()> {
    let connection = lapin::Connection::connect(url, Default::default()).await?;
    let channel = connection.create_channel().await?;
    let queues = (0..count)
        .map(|i| topology.module_queue(&format!("fib{i}").parse().unwrap()))
        .chain([topology.unrouted_queue(), topology.dead_queue()]);
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let exchanges = [
        topology.exchange().to_owned(),
        topology.unrouted_exchange(),
        topology.dead_exchange(),
        topology.control_exchange(),
    ];
    for exchange in exchanges {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}
