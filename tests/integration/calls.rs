//! Modules that call modules (`wasmrpc:compute/fleet`), through real nodes
//! and the real broker: `sumfib` fans out to `fib`; `relay` (copied as `a`,
//! `b`, `c`) passes its input down a chain and reports the first failure.

use std::time::Duration;

use futures_util::future::join_all;
use wasmrpc::client::Reply;
use wasmrpc::wire::ErrorKind;

use crate::support::http::metrics_until;
use crate::support::node::{REPLY_TIMEOUT, Setup, answered};
use crate::support::process::Spawn;
use crate::support::{TestNode, guests};

/// F(n), for small n.
fn fib(n: u64) -> u64 {
    (0..n).fold((0, 1), |(a, b), _| (b, a + b)).0
}

/// A node with `--concurrency 1` serving `fib`, `sumfib` (allowed to call
/// `fib`) and the relays `a`, `b` and `c` (allowed to call anything).
fn calling_node() -> Setup {
    relays(TestNode::setup(&["fib", "sumfib"]).manifest("sumfib", "calls = [\"fib\"]\n"))
        .config(|config| config.concurrency = 1)
}

fn relays(mut setup: Setup) -> Setup {
    let relay = std::fs::read(guests::wasm("relay")).unwrap();
    for name in ["a", "b", "c"] {
        setup = setup
            .file(&format!("{name}.wasm"), relay.clone())
            .manifest(name, "calls = [\"*\"]\n");
    }
    setup
}

fn ok(reply: &Reply) -> &str {
    assert_eq!(
        reply.error,
        None,
        "failed: {}",
        String::from_utf8_lossy(&reply.body)
    );
    std::str::from_utf8(&reply.body).unwrap()
}

/// The error reply's kind and body.
fn failed(reply: &Reply) -> (String, String) {
    let kind = reply.error.clone().expect("an error reply");
    (kind, String::from_utf8_lossy(&reply.body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn sumfib_sums_fib_over_the_fleet_and_counts_its_calls() {
    let mut node = calling_node().with_http().start().await;
    let reply = node.call("sumfib", "1..30").await;
    assert_eq!(ok(&reply), "2178308");
    assert_eq!((1..=30).map(fib).sum::<u64>(), 2_178_308);
    let labels = [("module", "sumfib"), ("outcome", "ok")];
    metrics_until(node.http.unwrap(), |metrics| {
        metrics.get("wasmrpc_child_calls_total", &labels) == Some(30.0)
    })
    .await;
    // The fleet says what each module may call.
    let nodes = node.client().await.fleet(REPLY_TIMEOUT).await.unwrap();
    let may_call = |name: &str| {
        let module = nodes[0].modules.iter().find(|module| module.name == name);
        module.unwrap().may_call.clone()
    };
    assert_eq!(
        (may_call("sumfib"), may_call("a")),
        (vec!["fib".to_owned()], vec!["*".to_owned()])
    );
    assert!(may_call("fib").is_empty());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_parents_of_eight_children_answer_on_one_core() {
    let mut node = calling_node().start().await;
    let client = node.client().await;
    // Every instance may be held by a waiting parent: children must still run.
    let calls = (0..8).map(|i| {
        let client = &client;
        async move {
            let (first, last) = (i * 8 + 1, i * 8 + 8);
            let reply = client
                .call(
                    "sumfib",
                    format!("{first}..{last}").as_bytes(),
                    REPLY_TIMEOUT,
                )
                .await
                .expect("no reply");
            (first, last, reply)
        }
    });
    for (first, last, reply) in join_all(calls).await {
        let expected: u64 = (first..=last).map(fib).sum();
        assert_eq!(ok(&reply), expected.to_string(), "sumfib {first}..{last}");
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_of_four_modules_answers() {
    let mut node = calling_node().start().await;
    let reply = node.call("a", "b,c,fib;30").await;
    assert_eq!(ok(&reply), "832040");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_calls_itself_ends_at_the_depth_limit() {
    let mut node = calling_node()
        .config(|config| config.children.max_depth = 3)
        .start()
        .await;
    let chain = ["a"; 10].join(",");
    let reply = node.call("a", format!("{chain};1")).await;
    let (kind, body) = failed(&reply);
    assert_eq!(kind, ErrorKind::GuestError.as_str(), "{body}");
    assert!(
        body.contains("too_deep") && body.contains("4 deep"),
        "{body}"
    );
    // Three hops are within the limit, and the node serves on.
    assert_eq!(ok(&node.call("a", "a,a,fib;10").await), "55");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_traps_times_out_or_is_served_by_nobody_fails_its_parent_with_its_kind() {
    let mut node = relays(TestNode::setup(&["fib", "panic", "spin"]))
        .manifest("spin", "[limits]\ntime = \"200ms\"\n")
        .start()
        .await;
    for (input, kind) in [
        ("panic;x", "trap"),
        ("spin;5000", "timeout"),
        ("nobody;1", "not_found"),
        ("fib;x", "bad_request"),
        ("*65,fib;1", "too_many"),
    ] {
        let reply = node.call("a", input).await;
        let (error, body) = failed(&reply);
        assert_eq!(error, ErrorKind::GuestError.as_str(), "{input}: {body}");
        assert!(body.contains(&format!(": {kind}: ")), "{input}: {body}");
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_gets_what_is_left_of_its_parents_deadline() {
    // The parent may run 700 ms; its child would sleep 3 s within its own
    // 10 s limit. Either the parent saw its child time out, or its own
    // time ran out first: both are a timeout at 700 ms, not a 3 s wait.
    let mut node = relays(TestNode::setup(&["nap"]))
        .manifest("a", "calls = [\"nap\"]\n[limits]\ntime = \"700ms\"\n")
        .start()
        .await;
    let started = std::time::Instant::now();
    let reply = node.call("a", "nap;3000").await;
    let elapsed = started.elapsed();
    let (kind, body) = failed(&reply);
    assert!(
        kind == ErrorKind::Timeout.as_str()
            || (kind == ErrorKind::GuestError.as_str() && body.contains("nap: timeout: ")),
        "{kind}: {body}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_are_denied_unless_the_manifest_names_them() {
    let relay = std::fs::read(guests::wasm("relay")).unwrap();
    let mut node = TestNode::setup(&["fib"])
        .file("narrow.wasm", relay.clone())
        .manifest("narrow", "calls = [\"fib\"]\n")
        .file("closed.wasm", relay)
        .with_http()
        .start()
        .await;
    // No manifest: the module is refused when loaded, and says why.
    assert!(node.registry.get(&"closed".parse().unwrap()).is_none());
    let (kind, body) = failed(&node.call("closed", "fib;1").await);
    assert_eq!(kind, ErrorKind::LoadFailed.as_str(), "{body}");
    assert!(body.contains("calls = ["), "{body}");
    // A call outside the list fails at once, one inside goes through.
    assert_eq!(ok(&node.call("narrow", "fib;12").await), "144");
    let (_, body) = failed(&node.call("narrow", "narrow,fib;1").await);
    assert!(body.contains("narrow: not_allowed: "), "{body}");
    // Refused calls are counted too.
    let refused = [("module", "narrow"), ("outcome", "not_allowed")];
    metrics_until(node.http.unwrap(), |metrics| {
        metrics.get("wasmrpc_child_calls_total", &refused) == Some(1.0)
    })
    .await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fan_out_spreads_over_two_nodes() {
    let first = relays(TestNode::setup(&["spin"]))
        .config(|config| config.concurrency = 1)
        .start()
        .await;
    let exchange = first.exchange().to_owned();
    let second = relays(TestNode::setup(&["spin"]))
        .exchange(&exchange)
        .config(|config| config.concurrency = 1)
        .start()
        .await;
    let reply = first.call("a", "*16,spin;100").await;
    assert_eq!(ok(&reply).lines().count(), 16);
    answered(&[&first, &second], 17).await;
    let spin = "spin".parse().unwrap();
    let (one, two) = (first.stats.calls(&spin), second.stats.calls(&spin));
    assert_eq!(one.answered + two.answered, 16);
    assert!(
        one.answered > 0 && two.answered > 0,
        "one node ran every child: {} and {}",
        one.answered,
        two.answered
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_whose_node_dies_runs_again_elsewhere_and_its_parent_gets_one_reply() {
    // The parent's node serves no `nap`: its child goes to a node process.
    let parent = relays(TestNode::setup(&[]))
        .manifest("a", "calls = [\"nap\"]\n[limits]\ntime = \"60s\"\n")
        .start()
        .await;
    let exchange = parent.exchange().to_owned();
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["nap"]);
    let mut doomed = Spawn::new(&exchange, &["nap"]).start().await;
    let client = parent.client().await;
    let call = tokio::spawn(async move {
        client
            .call("a", b"nap;2000", Duration::from_secs(60))
            .await
            .expect("no reply")
    });
    // The child runs on the doomed node; it dies without answering.
    let doomed = tokio::task::spawn_blocking(move || {
        doomed.wait_for_line("running");
        doomed.child.kill().unwrap();
        doomed.child.wait().unwrap();
        doomed
    })
    .await
    .unwrap();
    let _next = Spawn::new(&exchange, &["nap"]).start().await;
    let reply = call.await.unwrap();
    assert_eq!(ok(&reply), "slept for 2000 ms");
    drop(doomed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_past_the_waiting_bound_fails_busy_at_once() {
    let mut node = relays(TestNode::setup(&["nap"]))
        .config(|config| config.children.max_waiting = 1)
        .start()
        .await;
    let client = node.client().await;
    // Two parents call at once; one place for a waiting parent.
    let (one, two) = tokio::join!(
        client.call("a", b"nap;1500", REPLY_TIMEOUT),
        client.call("b", b"nap;1500", REPLY_TIMEOUT),
    );
    let mut outcomes: Vec<String> = [one.unwrap(), two.unwrap()]
        .iter()
        .map(|reply| match &reply.error {
            None => ok(reply).to_owned(),
            Some(_) => failed(reply).1,
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes[1], "slept for 1500 ms", "{outcomes:?}");
    assert!(
        outcomes[0].contains(": busy: the node holds as many waiting callers as it may"),
        "{outcomes:?}"
    );
    node.stop().await.unwrap();
}
