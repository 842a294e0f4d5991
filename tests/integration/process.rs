//! The node as an operator runs it: a process that stops warmly on SIGTERM
//! and does not depend on anyone reading its log.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use wasmrpc::client::Client;
use wasmrpc::wire::Topology;

use crate::support::node::delete_topology;
use crate::support::{amqp_url, guests, unique};

/// Waits until the node's log has a line containing `needle`, and returns it.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => continue,
            Err(error) => panic!("the node never logged {needle:?}: {error}"),
        }
    }
}

/// Starts `wasmrpc serve` on a fresh exchange with the given guests, its
/// stderr piped; returns once it has logged that it is ready.
fn spawn_node(
    guests: &[&str],
    exchange: &str,
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    tempfile::TempDir,
) {
    let modules = tempfile::tempdir().unwrap();
    for name in guests {
        std::fs::copy(
            guests::wasm(name),
            modules.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    let mut node = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
        .args(["serve", "--modules"])
        .arg(modules.path())
        .env("AMQP_URL", amqp_url())
        .env("WASMRPC_EXCHANGE", exchange)
        .env("RUST_LOG", "info,wasmrpc::request=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (sender, lines) = mpsc::channel();
    let stderr = BufReader::new(node.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                // The test stopped listening: stop reading, closing the pipe.
                return;
            }
        }
    });
    wait_for_line(&lines, "node ready");
    (node, lines, modules)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_call_still_delivers_its_reply_and_exits_0() {
    let exchange = unique("sigterm");
    let (mut node, lines, _modules) = {
        let exchange = exchange.clone();
        tokio::task::spawn_blocking(move || spawn_node(&["spin"], &exchange))
            .await
            .unwrap()
    };

    let client = Client::connect(&amqp_url(), &exchange).await.unwrap();
    let call =
        tokio::spawn(async move { client.call("spin", b"1500", Duration::from_secs(30)).await });
    let (lines, shutting_down) = tokio::task::spawn_blocking(move || {
        wait_for_line(&lines, "running");
        let status = Command::new("kill")
            .args(["-TERM", &node.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let shutting_down = wait_for_line(&lines, "shutting down");
        let exit = node.wait().unwrap();
        assert_eq!(exit.code(), Some(0), "the node should exit 0 after SIGTERM");
        (lines, shutting_down)
    })
    .await
    .unwrap();

    let reply = call
        .await
        .unwrap()
        .expect("the call in flight got no reply");
    assert_eq!(
        (reply.error, reply.body),
        (None, b"spun for 1500 ms".to_vec())
    );
    assert!(shutting_down.contains("in_flight=1"), "{shutting_down}");
    drop(lines);
    delete_topology(&Topology::new(&exchange), &["spin".parse().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_log_reader_is_gone_keeps_serving_and_stops_cleanly() {
    let exchange = unique("nolog");
    let (mut node, lines, _modules) = {
        let exchange = exchange.clone();
        tokio::task::spawn_blocking(move || spawn_node(&["fib"], &exchange))
            .await
            .unwrap()
    };
    // Closes the read end of the node's stderr once the reader thread
    // notices: every later log line fails to write.
    drop(lines);

    let client = Client::connect(&amqp_url(), &exchange).await.unwrap();
    for n in 0..20u32 {
        let reply = client
            .call("fib", n.to_string().as_bytes(), Duration::from_secs(10))
            .await;
        assert!(
            reply.is_ok(),
            "call {n} after the log reader left: {reply:?}"
        );
    }
    let exit = tokio::task::spawn_blocking(move || {
        Command::new("kill")
            .args(["-TERM", &node.id().to_string()])
            .status()
            .unwrap();
        node.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0));
    delete_topology(&Topology::new(&exchange), &["fib".parse().unwrap()]).await;
}
