//! A module that is loading is not "not found": calls made once its file is
//! in place (or its deploy taken) wait for it, however long it compiles, and
//! are told why if it then fails to load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::live::install;
use crate::support::{TestNode, amqp_url, guests};

/// Waits until the module's queue exists: the node has seen its file and
/// holds its requests.
async fn queue_declared(node: &TestNode, module: &str) {
    let queue = node.topology.module_queue(&module.parse().unwrap());
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the node never declared {queue}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `calls` calls of `module` at once, each waiting up to a minute.
async fn call_many(
    node: &TestNode,
    module: &'static str,
    calls: usize,
) -> Vec<(wasmrpc::client::Reply, Duration)> {
    let client = Arc::new(node.client().await);
    let started = Instant::now();
    let calls: Vec<_> = (0..calls)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let reply = client
                    .call(module, b"10", Duration::from_secs(60))
                    .await
                    .expect("no reply within a minute");
                (reply, started.elapsed())
            })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_made_while_a_module_compiles_wait_for_it() {
    let node = TestNode::start(&["fib"]).await;
    // The Python module takes seconds to compile.
    let pyfib = std::fs::read(guests::lang("pyfib")).unwrap();
    install(node.modules_path(), "pyfib", &pyfib);
    queue_declared(&node, "pyfib").await;
    let replies = call_many(&node, "pyfib", 8).await;
    let first = replies.iter().map(|(_, after)| *after).min().unwrap();
    println!("8 calls made while pyfib compiled: the first answered after {first:?}");
    for (reply, _) in &replies {
        assert_eq!(
            (reply.error.as_deref(), reply.body.as_slice()),
            (None, &b"55"[..]),
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    assert!(
        first > Duration::from_millis(500),
        "answered after {first:?}: the calls were not made while it compiled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_waiting_for_a_module_that_fails_to_load_are_told_why() {
    let node = TestNode::start(&["fib"]).await;
    // The Python module, with an import no node offers: it compiles for
    // seconds, then cannot be linked.
    let mut broken = std::fs::read(guests::lang("pyfib")).unwrap();
    let (from, to) = (b"wasi:cli/environment@", b"wasi:cli/environmenx@");
    let mut renamed = 0;
    for at in 0..broken.len() - from.len() {
        if &broken[at..at + from.len()] == from {
            broken[at..at + from.len()].copy_from_slice(to);
            renamed += 1;
        }
    }
    assert!(renamed > 0, "pyfib imports no wasi:cli/environment");
    install(node.modules_path(), "broken", &broken);
    queue_declared(&node, "broken").await;
    let waiting = call_many(&node, "broken", 4).await;
    for (reply, _) in &waiting {
        let message = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.error.as_deref(), Some("load_failed"), "{message}");
        assert!(
            message.contains("module \"broken\" could not be loaded")
                && message.contains("imports something other than WASI"),
            "{message}"
        );
    }
    // Later calls hear the same, at once.
    let later = node.call("broken", "10").await;
    assert_eq!(
        later.error.as_deref(),
        Some("load_failed"),
        "{}",
        String::from_utf8_lossy(&later.body)
    );
    // And a name nobody has is still not found.
    assert_eq!(
        node.call("nosuch", "10").await.error.as_deref(),
        Some("not_found")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_deployed_to_two_nodes_is_taken_by_both_and_served_at_once() {
    use crate::security::{Keys, deployer, write};
    let keys = Keys::new().await;
    let exchange = crate::support::unique("deploy-python");
    let taker = || {
        let trusted = keys.trusted();
        TestNode::setup(&[])
            .exchange(&exchange)
            .config(move |config| config.accept_deploys = Some(trusted))
            .start()
    };
    let (a, b) = (taker().await, taker().await);
    let dir = tempfile::tempdir().unwrap();
    let pyfib = std::fs::read(guests::lang("pyfib")).unwrap();
    let module = write(dir.path(), "pyfib.wasm", &pyfib);
    let started = Instant::now();
    let deployed = deployer(&amqp_url(), &exchange, &keys, &["deploy", &module]).await;
    let took = started.elapsed();
    println!(
        "deploying the {} MiB Python module to two nodes took {took:?}",
        pyfib.len() >> 20
    );
    assert_eq!(
        deployed.code,
        Some(0),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    for node in [&a, &b] {
        let line = deployed
            .stdout
            .lines()
            .find(|line| line.starts_with(&node.id))
            .unwrap_or_else(|| panic!("{}", deployed.stdout));
        assert!(line.contains("took it"), "{}", deployed.stdout);
    }
    // Taken means served: no call made now is "not found".
    for node in [&a, &b] {
        let reply = node.call("pyfib", "10").await;
        assert_eq!(
            (reply.error.as_deref(), reply.body.as_slice()),
            (None, &b"55"[..])
        );
    }
}

/// Three nodes on one exchange, of which only the first gets `module`;
/// the first takes deploys signed by `keys`.
async fn three_nodes(keys: &crate::security::Keys) -> (String, [TestNode; 3]) {
    let exchange = crate::support::unique("knows");
    let trusted = keys.trusted();
    let a = TestNode::setup(&["fib"])
        .exchange(&exchange)
        .config(move |config| config.accept_deploys = Some(trusted))
        .start()
        .await;
    let b = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    let c = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    (exchange, [a, b, c])
}

/// `calls` calls of `module` with `input` through `client`, all at once.
async fn at_once(
    client: &Arc<wasmrpc::client::Client>,
    module: &'static str,
    input: &'static [u8],
    calls: usize,
) -> Vec<wasmrpc::client::Reply> {
    let calls: Vec<_> = (0..calls)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call(module, input, Duration::from_secs(120))
                    .await
                    .expect("no reply within two minutes")
            })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_node_that_knows_a_module_says_what_became_of_it() {
    let keys = crate::security::Keys::new().await;
    let (exchange, [a, _b, _c]) = three_nodes(&keys).await;
    let client = Arc::new(TestNode::client_for(&exchange).await);

    // Nobody has it: not_found, within the second the contract promises.
    let started = Instant::now();
    let replies = at_once(&client, "nosuch", b"1", 3).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for reply in &replies {
        assert_eq!(reply.error.as_deref(), Some("not_found"));
    }

    // A slow-to-compile module dropped into one node's directory, called at
    // once: every call waits for it, whichever node took it first.
    let js = std::fs::read(guests::lang("jsstats")).unwrap();
    install(a.modules_path(), "jsstats", &js);
    let installed = Instant::now();
    let replies = at_once(&client, "jsstats", b"[1, 2]", 6).await;
    println!(
        "6 calls made as jsstats was dropped in: answered after {:?}",
        installed.elapsed()
    );
    for reply in replies {
        assert_eq!(
            (
                reply.error.as_deref(),
                String::from_utf8_lossy(&reply.body).trim()
            ),
            (None, r#"{"count":2,"sum":3,"mean":1.5,"min":1,"max":2}"#)
        );
    }

    // A module that fails to load on one node: every call hears why.
    install(a.modules_path(), "broken", b"not a module");
    queue_declared(&a, "broken").await;
    for reply in at_once(&client, "broken", b"1", 6).await {
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        assert_eq!(reply.error.as_deref(), Some("load_failed"), "{body}");
        assert!(body.contains("could not be loaded"), "{body}");
    }
    // And once its file is gone, nobody knows it.
    std::fs::remove_file(a.modules_path().join("broken.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client
            .call("broken", b"1", Duration::from_secs(10))
            .await
            .unwrap();
        if reply.error.as_deref() == Some("not_found") {
            break;
        }
        assert!(Instant::now() < deadline, "still {:?}", reply.error);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_made_while_a_deploy_compiles_wait_for_it_on_any_node() {
    use crate::security::{Keys, deployer, write};
    let keys = Keys::new().await;
    let (exchange, [a, _b, _c]) = three_nodes(&keys).await;
    let client = Arc::new(TestNode::client_for(&exchange).await);
    let dir = tempfile::tempdir().unwrap();
    let js = std::fs::read(guests::lang("jsstats")).unwrap();
    let module = write(dir.path(), "jsdeployed.wasm", &js);
    let deploying = {
        let (exchange, url) = (exchange.clone(), amqp_url());
        tokio::spawn(async move { deployer(&url, &exchange, &keys, &["deploy", &module]).await })
    };
    // While it compiles on the one node that takes deploys, its queue holds
    // the calls, which every node routes there.
    queue_declared(&a, "jsdeployed").await;
    let replies = at_once(&client, "jsdeployed", b"[4]", 6).await;
    let deployed = deploying.await.unwrap();
    assert_eq!(
        deployed.code,
        Some(0),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    for reply in replies {
        assert_eq!(
            reply.error,
            None,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
}
