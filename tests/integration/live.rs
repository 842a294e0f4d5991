//! Modules come and go while the node runs: dropped in, replaced (under
//! load), refused when broken, removed; every reply names its version.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmrpc::client::{Client, Reply};
use wasmrpc::names::ModuleName;

use crate::support::guests::variant;
use crate::support::{TestNode, guests, unique};

/// The version a node gives these bytes: the start of their SHA-256.
pub(crate) fn version_of(wasm: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(wasm);
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Puts `bytes` in place as `dir/NAME.wasm` the documented safe way: written
/// beside under a name the node ignores, then renamed.
pub(crate) fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let partial = dir.join(format!(".{name}.wasm.partial"));
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, dir.join(format!("{name}.wasm"))).unwrap();
}

/// Calls until `done` says the reply is the awaited one; the node answers
/// at once either way, so this awaits the change, not a timer.
async fn call_until(
    client: &Client,
    module: &str,
    within: Duration,
    done: impl Fn(&Reply) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let reply = client
            .call(module, b"10", Duration::from_secs(10))
            .await
            .expect("no reply");
        if done(&reply) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still {reply:?} after {within:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_moved_into_the_directory_is_served_within_2_s() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let reply = client
        .call("spin", b"10", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.error.as_deref(), Some("not_found"));

    let spin = std::fs::read(guests::wasm("spin")).unwrap();
    install(node.modules_path(), "spin", &spin);
    let took = call_until(&client, "spin", Duration::from_secs(2), |reply| {
        reply.error.is_none()
    })
    .await;
    println!("a new module served {took:?} after its file was renamed into place");
    let reply = client
        .call("spin", b"10", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.body, b"spun for 10 ms");
    assert_eq!(reply.version.as_deref(), Some(version_of(&spin).as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_place_is_served_once_complete_and_not_before() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let old = std::fs::read(guests::wasm("fib")).unwrap();
    let new = variant(&old, "written in place");

    // Truncate and write half: a node acting on this would serve nothing, or
    // fail calls.
    let refused = node.stats.refused();
    let path = node.modules_path().join("fib.wasm");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&new[..new.len() / 2]).unwrap();
    file.flush().unwrap();
    for _ in 0..20 {
        let reply = client
            .call("fib", b"20", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((reply.error, reply.body), (None, b"6765".to_vec()));
        assert_eq!(reply.version.as_deref(), Some(version_of(&old).as_str()));
    }
    file.write_all(&new[new.len() / 2..]).unwrap();
    drop(file);
    let expected = version_of(&new);
    call_until(&client, "fib", Duration::from_secs(2), |reply| {
        reply.version.as_deref() == Some(expected.as_str())
    })
    .await;
    // A node that read the file before it was closed would have refused
    // the half it found (it is not a module) and counted it.
    assert_eq!(*refused.borrow(), 0, "the half-written file was read");
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_module_under_load_fails_no_call() {
    let node = TestNode::start(&["fib"]).await;
    let v1 = std::fs::read(guests::wasm("fib")).unwrap();
    let v2 = variant(&v1, "v2");
    let (version1, version2) = (version_of(&v1), version_of(&v2));

    let client = Arc::new(node.client().await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..4u32 {
        let (client, stop) = (client.clone(), stop.clone());
        callers.spawn(async move {
            let mut seen = Vec::new();
            let mut n = caller;
            while !stop.load(Ordering::Relaxed) {
                let reply = client.call("fib", b"30", Duration::from_secs(10)).await;
                let reply = reply.unwrap_or_else(|error| {
                    panic!("call {n} of caller {caller} got no reply: {error}")
                });
                assert_eq!(
                    (reply.error.as_deref(), reply.body.as_slice()),
                    (None, &b"832040"[..]),
                    "call {n}"
                );
                seen.push(reply.version.expect("a reply without x-module-version"));
                n += 4;
            }
            seen
        });
    }

    let observer = node.client().await;
    for round in 0..6 {
        let (bytes, version) = if round % 2 == 0 {
            (&v2, &version2)
        } else {
            (&v1, &version1)
        };
        install(node.modules_path(), "fib", bytes);
        call_until(&observer, "fib", Duration::from_secs(2), |reply| {
            reply.version.as_ref() == Some(version)
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeMap::new();
    while let Some(versions) = callers.join_next().await {
        for version in versions.unwrap() {
            *seen.entry(version).or_insert(0usize) += 1;
        }
    }
    println!("replies per version during six swaps: {seen:?}");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), {
        let mut both = vec![version1, version2];
        both.sort();
        both
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_replacement_is_refused_and_the_last_good_version_serves_on() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let good = version_of(&std::fs::read(guests::wasm("fib")).unwrap());
    let wrong_world = wat::parse_str("(component)").unwrap();
    let mut refused = node.stats.refused();
    for broken in [
        &b"not wasm"[..],
        b"",
        b"\0asm\x0d\0\x01\0garbage",
        &wrong_world,
    ] {
        // (The watcher may show one file twice: it is refused each time.)
        let before = *refused.borrow_and_update();
        install(node.modules_path(), "fib", broken);
        // Once the loader has refused it, the good one answers.
        tokio::time::timeout(
            Duration::from_secs(10),
            refused.wait_for(|&count| count > before),
        )
        .await
        .expect("the broken file was not refused")
        .unwrap();
        for _ in 0..10 {
            let reply = client
                .call("fib", b"12", Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(
                (reply.error, reply.body, reply.version.as_deref()),
                (None, b"144".to_vec(), Some(good.as_str()))
            );
        }
    }
    // A good file again is taken.
    let fixed = variant(&std::fs::read(guests::wasm("fib")).unwrap(), "fixed");
    install(node.modules_path(), "fib", &fixed);
    let expected = version_of(&fixed);
    call_until(&client, "fib", Duration::from_secs(2), |reply| {
        reply.version.as_deref() == Some(expected.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_module_is_no_longer_served_and_its_queue_goes_with_the_last_node() {
    let node = TestNode::start(&["fib", "spin"]).await;
    let client = node.client().await;
    // A request in flight when the file goes still finishes.
    let in_flight = {
        let client = node.client().await;
        tokio::spawn(async move { client.call("spin", b"400", Duration::from_secs(10)).await })
    };
    node.running(1).await;
    std::fs::remove_file(node.modules_path().join("spin.wasm")).unwrap();
    let reply = in_flight
        .await
        .unwrap()
        .expect("the request in flight got no reply");
    assert_eq!(
        (reply.error, reply.body),
        (None, b"spun for 400 ms".to_vec())
    );

    call_until(&client, "spin", Duration::from_secs(2), |reply| {
        reply.error.as_deref() == Some("not_found")
    })
    .await;
    let reply = client
        .call("spin", b"1", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        "no node serves module \"spin\""
    );
    // The other module is untouched.
    let reply = client
        .call("fib", b"10", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.body, b"55");
    // And the queue is gone, not left to fill with requests nobody takes.
    let raw = crate::support::raw::RawClient::connect().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = node.topology.module_queue(&"spin".parse().unwrap());
    let started = Instant::now();
    loop {
        let declared = raw
            .channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await;
        if declared.is_err() {
            break;
        }
        // A queue is never deleted within a second of being declared
        // (`node::subscriptions::QUEUE_SETTLE`).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "queue {queue} is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_module_from_one_node_leaves_it_to_the_others() {
    let exchange = unique("two");
    let first = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    let second = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    let fib: ModuleName = "fib".parse().unwrap();

    std::fs::remove_file(first.modules_path().join("fib.wasm")).unwrap();
    let client = first.client().await;
    // Once the first node has let fib go, every call lands on the second.
    first
        .until_registry(Duration::from_secs(2), |registry| {
            registry.get(&fib).is_none()
        })
        .await;
    let before = (
        first.stats.calls(&fib).answered,
        second.stats.calls(&fib).answered,
    );
    for n in 0..30u32 {
        let reply = client
            .call("fib", n.to_string().as_bytes(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            reply.error,
            None,
            "call {n}: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    // A call counts once the node has the broker's confirm of its reply,
    // which may come a moment after the caller has the reply.
    crate::support::node::answered(&[&second], before.1 + 30).await;
    assert_eq!(second.stats.calls(&fib).answered, before.1 + 30);
    assert_eq!(
        first.stats.calls(&fib).answered,
        before.0,
        "the first node answered after letting fib go"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_reply_a_module_produced_names_its_version() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let version = version_of(&std::fs::read(guests::wasm("fib")).unwrap());
    for input in [&b"10"[..], b"abc"] {
        let reply = client
            .call("fib", input, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            reply.version.as_deref(),
            Some(version.as_str()),
            "{:?}",
            reply.error
        );
    }
    // No module, no version.
    let reply = client
        .call("nosuchmodule", b"1", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (reply.error.as_deref(), reply.version),
        (Some("not_found"), None)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_with_invalid_names_are_never_served() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let long = "x".repeat(65);
    for name in ["Fib", "fib.v2", "fib space", long.as_str()] {
        install(node.modules_path(), name, &fib);
    }
    // Rename a valid one in last: once it is served, the others were seen.
    install(node.modules_path(), "fib2", &fib);
    call_until(&client, "fib2", Duration::from_secs(2), |reply| {
        reply.error.is_none()
    })
    .await;
    let mut served = node.registry.names();
    served.sort();
    assert_eq!(served, ["fib".parse().unwrap(), "fib2".parse().unwrap()]);
    for name in ["Fib", "fib.v2", long.as_str()] {
        let reply = client
            .call(name, b"1", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(reply.error.as_deref(), Some("bad_request"), "{name}");
    }
}
