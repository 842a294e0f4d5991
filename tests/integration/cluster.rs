//! wasmrpc nodes on a 3-node RabbitMQ cluster, started with `scripts/cluster`:
//! the broker node that leads a module's quorum queue is stopped while calls
//! stream in; the wasmrpc nodes fail over to the other broker nodes, and no
//! call whose publish the broker confirmed goes unanswered.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::ledger::CarefulCaller;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::{guests, unique};

/// A cluster of `scripts/cluster`, stopped and deleted when dropped.
struct Cluster {
    dir: TempDir,
    urls: String,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports();
        let output = script(dir.path(), &["start", "--port", &port.to_string()]);
        Cluster {
            dir,
            urls: output.trim().to_owned(),
        }
    }

    /// The RabbitMQ node (1-3) that leads `queue`.
    fn leader(&self, queue: &str) -> u8 {
        script(self.dir.path(), &["leader", queue])
            .trim()
            .parse()
            .unwrap()
    }

    fn stop_node(&self, node: u8) {
        script(self.dir.path(), &["stop-node", &node.to_string()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(guests::repo().join("scripts/cluster"))
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `scripts/cluster` on the cluster in `dir`; its stdout.
fn script(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(guests::repo().join("scripts/cluster"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/cluster {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A base port such that it, the next two, and those ten above are free.
fn free_ports() -> u16 {
    loop {
        let base = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        let ports = [0, 1, 2, 10, 11, 12].map(|offset| base + offset);
        if ports
            .iter()
            .all(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        {
            return base;
        }
    }
}

async fn log_line(node: NodeProcess, needle: &'static str) -> (NodeProcess, String) {
    tokio::task::spawn_blocking(move || {
        let line = node.wait_for_line_within(needle, Duration::from_secs(30));
        (node, line)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_on_a_cluster_ride_through_the_loss_of_a_queue_leader() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let exchange = unique("cluster");
    let spawn = Spawn::new(&exchange, &["fib"]).url(&cluster.urls);
    let mut nodes = vec![spawn.clone().start().await, spawn.start().await];
    let calls = 600;
    // The caller's reply queue lives on the third broker node, away from
    // the one the test stops: a quorum queue whose leader is stopped has,
    // on RabbitMQ 3.10, sometimes nacked publishes for over a minute, and
    // the test is of the wasmrpc nodes, not of the caller's queue.
    let caller_urls = {
        let mut urls: Vec<&str> = cluster.urls.split(',').collect();
        urls.reverse();
        urls.join(",")
    };
    let caller =
        CarefulCaller::start(caller_urls.parse().unwrap(), &exchange, calls, 40.0, 64).await;

    caller.sent(calls / 3).await;
    let queue = format!("{exchange}.module.fib");
    // Quorum queues are led from the broker node that declared them: the
    // first of the list, which the wasmrpc nodes and the caller all use.
    let (cluster, leader) = tokio::task::spawn_blocking(move || {
        let leader = cluster.leader(&queue);
        (cluster, leader)
    })
    .await
    .unwrap();
    assert_eq!(leader, 1, "the queue is led from the first broker node");
    let stopped = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_node(leader);
        cluster
    })
    .await
    .unwrap();

    let (tally, gaps) = caller
        .finish(
            calls,
            Duration::from_secs(60),
            &[(stopped, Instant::now() + Duration::from_secs(3600))],
        )
        .await;
    println!(
        "cluster: {calls} calls in {:.1} s (cluster start included); broker node {leader} stopped; \
         longest wait for any answer after: {:.2} s; {tally}",
        started.elapsed().as_secs_f64(),
        gaps[0].as_secs_f64()
    );
    if tally.lost > 0 || tally.sent as u64 != calls {
        for (i, node) in nodes.iter().enumerate() {
            eprintln!("node {i}: {}", node.ready);
            for line in node.unread_log() {
                eprintln!("node {i}: {line}");
            }
        }
    }
    assert_eq!(
        (tally.sent as u64, tally.lost, tally.wrong),
        (calls, 0, 0),
        "{tally}"
    );
    for node in std::mem::take(&mut nodes) {
        let (mut node, ready) = log_line(node, "session=2").await;
        assert!(ready.contains("node ready"), "{ready}");
        assert!(node.is_running());
    }
    drop(cluster);
}
