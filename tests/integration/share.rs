//! Modules share a node: one whose requests sleep in a host call, or compute
//! without end, cannot keep the node from answering the others. It holds at
//! most half the node's instances, and a guest holds a permit to compute
//! only while it computes, 10 ms at a time.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{TestNode, oracle};

/// Fills a node of concurrency 2 with calls of `hostile` (more than the
/// node has instances), then checks that `fib` is answered, right, while
/// every one of those calls is still in progress.
async fn fib_is_answered_beside(hostile: &str, body: &'static str) {
    let node = TestNode::setup(&[hostile, "fib"])
        .manifest(hostile, "[limits]\ntime = \"60s\"\n")
        .config(|config| {
            config.concurrency = 2;
            config.prefetch = 32;
        })
        .start()
        .await;
    let client = Arc::new(node.client().await);
    let hostile_calls: Vec<_> = (0..16)
        .map(|_| {
            let (client, hostile) = (client.clone(), hostile.to_owned());
            tokio::spawn(async move {
                client
                    .call(&hostile, body.as_bytes(), Duration::from_secs(90))
                    .await
            })
        })
        .collect();
    // 2 × 4 instances, half of them for one module.
    node.running(4).await;

    let started = std::time::Instant::now();
    for n in 0..20u32 {
        let reply = client
            .call("fib", n.to_string().as_bytes(), Duration::from_secs(10))
            .await
            .expect("fib got no reply");
        assert_eq!(
            (reply.error, reply.body),
            (None, oracle::fib_decimal(n).into_bytes()),
            "fib({n})"
        );
    }
    eprintln!("20 fib calls beside {hostile}: {:?}", started.elapsed());
    assert!(
        hostile_calls.iter().all(|call| !call.is_finished()),
        "fib should be answered while every {hostile} call is still in progress"
    );
    for call in hostile_calls {
        call.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_module_whose_calls_sleep_cannot_starve_the_others() {
    // Each call sleeps 60 s in a WASI call: it holds an instance, no CPU.
    fib_is_answered_beside("nap", "60000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_module_whose_calls_loop_cannot_starve_the_others() {
    // Each call computes until its 60 s limit: the node shares the CPU.
    fib_is_answered_beside("forever", "").await;
}
