//! The node as an operator runs it: a process that stops warmly on SIGTERM
//! and does not depend on anyone reading its log.

use std::time::Duration;

use wasmrpc::client::Client;

use crate::support::node::Cleanup;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::{brokers, unique};

/// Starts a node process.
async fn spawn(
    guests: &'static [&'static str],
    files: &'static [(&'static str, &'static str)],
    exchange: &str,
    env: &'static [(&'static str, &'static str)],
) -> NodeProcess {
    let mut spawn = Spawn::new(exchange, guests);
    for (name, contents) in files {
        spawn = spawn.file(name, contents);
    }
    for (name, value) in env {
        spawn = spawn.env(name, value);
    }
    spawn.start().await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_call_still_delivers_its_reply_and_exits_0() {
    let exchange = unique("sigterm");
    let _cleanup = Cleanup::new(&exchange, &["spin"]);
    let mut node = spawn(&["spin"], &[], &exchange, &[]).await;
    let client = Client::connect(&brokers(), &exchange).await.unwrap();
    let call =
        tokio::spawn(async move { client.call("spin", b"1500", Duration::from_secs(30)).await });
    let (node, shutting_down) = tokio::task::spawn_blocking(move || {
        node.wait_for_line("running");
        node.signal("TERM");
        let shutting_down = node.wait_for_line("shutting down");
        let exit = node.child.wait().unwrap();
        assert_eq!(exit.code(), Some(0), "the node should exit 0 after SIGTERM");
        (node, shutting_down)
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
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_cuts_the_drain_short_with_exit_130_and_the_call_is_served_again() {
    let exchange = unique("sigint2");
    let _cleanup = Cleanup::new(&exchange, &["spin"]);
    let mut node = spawn(&["spin"], &[], &exchange, &[]).await;
    let client = Client::connect(&brokers(), &exchange).await.unwrap();
    let call =
        tokio::spawn(async move { client.call("spin", b"5000", Duration::from_secs(60)).await });
    let node = tokio::task::spawn_blocking(move || {
        node.wait_for_line("running");
        node.signal("INT");
        node.wait_for_line("shutting down");
        node.signal("INT");
        node.wait_for_line("second stop signal");
        let exit = node.child.wait().unwrap();
        assert_eq!(exit.code(), Some(130), "a second signal exits 130");
        node
    })
    .await
    .unwrap();
    // The call the drain gave up went back to its queue: a node started
    // now serves it.
    let _again = spawn(&["spin"], &[], &exchange, &[]).await;
    let reply = call.await.unwrap().expect("the call was lost");
    assert_eq!(reply.body, b"spun for 5000 ms");
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_log_reader_is_gone_keeps_serving_and_stops_cleanly() {
    let exchange = unique("nolog");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let mut node = spawn(&["fib"], &[], &exchange, &[]).await;
    // Closes the read end of the node's stderr once the reader thread
    // notices: every later log line fails to write.
    drop(std::mem::replace(
        &mut node.log,
        std::sync::mpsc::channel().1,
    ));

    let client = Client::connect(&brokers(), &exchange).await.unwrap();
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
        node.signal("TERM");
        node.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_can_be_set_from_the_environment() {
    let exchange = unique("envlimits");
    let _cleanup = Cleanup::new(&exchange, &["forever", "spin"]);
    let node = spawn(
        &["forever", "spin"],
        &[("spin.toml", "[limits]\ntime = \"400ms\"\n")],
        &exchange,
        &[("WASMRPC_TIME_LIMIT", "250ms")],
    )
    .await;
    let client = Client::connect(&brokers(), &exchange).await.unwrap();
    let reply = client
        .call("forever", b"", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.error.as_deref(), Some("timeout"));
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        "forever: ran longer than its time limit of 250 ms"
    );
    // A manifest wins over the operator's setting.
    let reply = client
        .call("spin", b"5000", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        "spin: ran longer than its time limit of 400 ms"
    );
    drop(node);
}
