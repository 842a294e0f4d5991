//! A soak: three nodes under a stream of calls while they suffer one fault
//! of each kind (a node SIGKILLed and restarted, a node's connection cut
//! and restored, a node SIGTERMed and restarted, the broker restarted), and
//! not one call whose publish the broker confirmed goes unanswered.
//!
//! The suite runs 1,000 calls; `scripts/soak` runs 10,000
//! (`WASMRPC_SOAK_CALLS`), over `WASMRPC_SOAK_SECONDS` (20) plus the time
//! the faults take. The broker is a private one: it is restarted.

use std::time::{Duration, Instant};

use crate::support::broker::PrivateBroker;
use crate::support::ledger::CarefulCaller;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::proxy::Proxy;
use crate::support::unique;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Waits, off the async runtime, for a node process to exit; its status code.
async fn exited(mut node: NodeProcess) -> Option<i32> {
    tokio::task::spawn_blocking(move || node.child.wait().unwrap().code())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_loses_no_call_through_a_kill_a_cut_a_stop_and_a_broker_restart() {
    let calls = setting("WASMRPC_SOAK_CALLS", 1_000);
    let seconds = setting("WASMRPC_SOAK_SECONDS", 20);
    let mut broker = PrivateBroker::start(&[]).await;
    let exchange = unique("soak");
    let proxies = [
        Proxy::start(&broker.url()).await,
        Proxy::start(&broker.url()).await,
        Proxy::start(&broker.url()).await,
    ];
    let spawns: Vec<Spawn> = proxies
        .iter()
        .map(|proxy| Spawn::new(&exchange, &["fib"]).url(&proxy.url()))
        .collect();
    let mut nodes = Vec::new();
    for spawn in &spawns {
        nodes.push(spawn.clone().start().await);
    }

    let started = Instant::now();
    let caller = CarefulCaller::start(
        broker.url().parse().unwrap(),
        &exchange,
        calls,
        calls as f64 / seconds as f64,
        64,
    )
    .await;
    let mut faults = Vec::new();
    let at = |fraction: f64| (calls as f64 * fraction) as u64;

    caller.sent(at(0.15)).await;
    let fault = Instant::now();
    nodes[0].signal("KILL");
    let killed = std::mem::replace(&mut nodes[0], spawns[0].clone().start().await);
    drop(killed);
    faults.push(("node SIGKILLed and restarted", fault, Instant::now()));

    caller.sent(at(0.35)).await;
    let fault = Instant::now();
    proxies[1].cut();
    // The cut lasts 3 s: a network blip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxies[1].restore();
    faults.push(("node's connection cut for 3 s", fault, Instant::now()));

    caller.sent(at(0.55)).await;
    let fault = Instant::now();
    nodes[2].signal("TERM");
    let stopped = std::mem::replace(&mut nodes[2], spawns[2].clone().start().await);
    assert_eq!(
        exited(stopped).await,
        Some(0),
        "SIGTERM should end a node warmly"
    );
    faults.push(("node SIGTERMed and restarted", fault, Instant::now()));

    caller.sent(at(0.75)).await;
    let fault = Instant::now();
    broker.stop().await;
    broker.start_again().await;
    faults.push(("broker restarted", fault, Instant::now()));

    // Each fault's effects last until the next one starts, or the run ends.
    let ends = faults
        .iter()
        .skip(1)
        .map(|&(_, start, _)| start)
        .chain([Instant::now() + Duration::from_secs(3600)]);
    let windows: Vec<_> = faults
        .iter()
        .zip(ends)
        .map(|(&(_, start, _), end)| (start, end))
        .collect();
    let (tally, gaps) = caller
        .finish(calls, Duration::from_secs(60), &windows)
        .await;

    println!(
        "soak: {calls} calls in {:.1} s, 3 nodes",
        started.elapsed().as_secs_f64()
    );
    for ((name, start, end), gap) in faults.iter().zip(&gaps) {
        println!(
            "  {name:<32} took {:>5.1} s; longest wait for any answer: {:.2} s",
            (*end - *start).as_secs_f64(),
            gap.as_secs_f64()
        );
    }
    println!("  {tally}");
    for node in &mut nodes {
        assert!(node.is_running(), "a node exited during the soak");
    }
    assert_eq!(tally.sent as u64, calls, "{tally}");
    assert_eq!((tally.lost, tally.wrong), (0, 0), "{tally}");
}
