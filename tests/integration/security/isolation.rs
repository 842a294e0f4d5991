//! No caller's requests cost another caller anything it can notice: tried
//! as a restricted caller would (the permissions `wasmrpc broker-permissions
//! caller` prints, on a private broker with real users), with hostile
//! `reply_to` names, callee names, panicking tasks and forged headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use wasmrpc::client::Client;
use wasmrpc::wire::Topology;

use crate::cli::{run, text, wasmrpc};
use crate::support::broker::PrivateBroker;
use crate::support::http::{self, metrics_until};
use crate::support::process::Spawn;
use crate::support::raw::{self, RawClient};
use crate::support::{TestNode, unique};

const PASSWORD: &str = "secret";

/// A private broker with a node user and the restricted callers `alice`
/// (honest) and `mallory`, each allowed `modules`, on `exchange`.
async fn broker_with_callers(exchange: &str, modules: &str) -> PrivateBroker {
    let broker = PrivateBroker::start(&[]).await;
    let mut script = String::new();
    for user in ["node", "alice", "mallory"] {
        script.push_str(&format!("rabbitmqctl add_user {user} {PASSWORD}\n"));
    }
    let permissions = |args: Vec<&str>| {
        let mut all = vec!["broker-permissions"];
        all.extend(args);
        wasmrpc(exchange, &all)
    };
    for args in [
        vec!["node", "--user", "node"],
        vec!["caller", "--user", "alice", "--modules", modules],
        vec!["caller", "--user", "mallory", "--modules", modules],
    ] {
        let output = run(permissions(args)).await;
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        script += &text(&output.stdout);
    }
    broker.ctl(&script).await;
    broker
}

/// How many messages wait in `queue`.
async fn waiting(raw: &RawClient, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    raw.channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// Honest calls of `fib 15`, 16 at a time, for `window`: how many were
/// answered right. Any other answer fails the test.
async fn honest_answers(client: &Arc<Client>, window: Duration) -> u64 {
    let answered = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + window;
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (client, answered) = (client.clone(), answered.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let reply = client
                        .call("fib", b"15", Duration::from_secs(10))
                        .await
                        .expect("an honest call got no reply");
                    assert_eq!((reply.error, reply.body.as_slice()), (None, &b"610"[..]));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    answered.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_reply_to_names_cost_honest_callers_nothing() {
    let exchange = unique("replyto");
    let broker = broker_with_callers(&exchange, "fib").await;
    let node_url = broker.url_as("node", PASSWORD);
    let node = TestNode::setup(&["fib"])
        .exchange(&exchange)
        .with_http()
        .config(move |config| config.brokers = node_url.parse().unwrap())
        .start()
        .await;
    let addr = node.http.unwrap();
    let topology = Topology::new(&exchange);
    let alice = Arc::new(
        Client::connect(
            &broker.url_as("alice", PASSWORD).parse().unwrap(),
            &exchange,
        )
        .await
        .unwrap(),
    );
    let before = honest_answers(&alice, Duration::from_secs(2)).await;

    // 100 hostile requests a second, for 2 s, while alice calls on: names
    // RabbitMQ closes the publisher's connection over (malformed, or for a
    // broker node it does not know), and the fleet's own queues.
    let mallory = RawClient::connect_to(&broker.url_as("mallory", PASSWORD)).await;
    let attacking = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let attack = {
        let (attacking, sent, topology) = (attacking.clone(), sent.clone(), topology.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u64;
            while attacking.load(Ordering::Relaxed) && n < 1000 {
                ticks.tick().await;
                let reply_to = match n % 4 {
                    0 => format!("amq.rabbitmq.reply-to.AAAA{n}.key"),
                    1 => raw::direct_reply_to_for_node(&format!("reply@{}", 1_000_000 + n)),
                    2 => topology.dead_queue(),
                    _ => topology.module_queue(&"fib".parse().unwrap()),
                };
                let properties = BasicProperties::default()
                    .with_reply_to(reply_to.as_str().into())
                    .with_correlation_id(format!("hostile-{n}").as_str().into());
                mallory
                    .publish(topology.exchange(), "fib", b"10", properties)
                    .await;
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
        })
    };
    let during = honest_answers(&alice, Duration::from_secs(2)).await;
    attacking.store(false, Ordering::Relaxed);
    attack.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= 100, "only {sent} hostile requests sent");

    // Honest callers kept their pace (loosely: the benchmark measures it).
    let ratio = during as f64 / before as f64;
    eprintln!(
        "honest answers in 2 s: {before} quiet, {during} beside {sent} hostile ({ratio:.2}x)"
    );
    assert!(
        ratio >= 0.5,
        "honest answers fell from {before} to {during} in 2 s ({ratio:.2}x)"
    );
    // Every hostile request was settled: counted, nothing published.
    let refused = |m: &http::Exposition, reason| {
        m.get("wasmrpc_replies_refused_total", &[("reason", reason)])
            .unwrap_or(0.0)
    };
    let metrics = metrics_until(addr, |m| {
        ["malformed", "broker", "unproven", "fleet_queue"]
            .iter()
            .map(|reason| refused(m, reason))
            .sum::<f64>()
            == sent as f64
    })
    .await;
    // Names for unknown broker nodes: a few a second tried (and refused by
    // the broker), the rest refused without costing it a connection.
    let (tried, unproven) = (refused(&metrics, "broker"), refused(&metrics, "unproven"));
    assert!(
        tried + unproven >= (sent / 4) as f64,
        "{tried} + {unproven}"
    );
    assert!((1.0..=15.0).contains(&tried), "{tried} tried");
    let raw = RawClient::connect_to(&broker.url_as("node", PASSWORD)).await;
    assert_eq!(waiting(&raw, &topology.dead_queue()).await, 0);
    let fib = topology.module_queue(&"fib".parse().unwrap());
    assert_eq!(waiting(&raw, &fib).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_reply_to_patterns_leave_other_queues_alone() {
    let exchange = unique("replypolicy");
    let node = TestNode::setup(&["fib"])
        .exchange(&exchange)
        .with_http()
        .config(|config| {
            config.reply_to = "amq.rabbitmq.reply-to.*,amq.gen-*"
                .split(',')
                .map(|p| wasmrpc::reply_to::Pattern::new(p).unwrap())
                .collect();
        })
        .start()
        .await;
    let addr = node.http.unwrap();
    // Another team's queue, which a caller would have replies written into.
    let mut tutorial = RawClient::connect().await;
    let orders = unique("orders");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    tutorial
        .channel
        .queue_declare(orders.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    let properties = BasicProperties::default()
        .with_reply_to(orders.as_str().into())
        .with_correlation_id("into-orders".into());
    tutorial.publish(&exchange, "fib", b"10", properties).await;
    metrics_until(addr, |m| {
        m.get(
            "wasmrpc_replies_refused_total",
            &[("reason", "not_allowed")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(waiting(&tutorial, &orders).await, 0);
    // The tutorial's own server-named queue and direct reply-to are answered.
    assert_eq!(
        raw::body(&tutorial.call(&exchange, "fib", b"20").await),
        "6765"
    );
    assert_eq!(node.call("fib", "10").await.body, b"55");
}

/// A request that asks its task to panic (in a test build), with a forged
/// `x-acquired-count` that RabbitMQ 3.x does not stamp.
#[cfg(feature = "fault-injection")]
fn panicking(caller: &RawClient, n: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-wasmrpc-test-panic".into(),
        AMQPValue::LongString("yes".into()),
    );
    headers.insert("x-acquired-count".into(), AMQPValue::LongLongInt(99));
    caller.request(&format!("panic-{n}")).with_headers(headers)
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_request_task_that_panics_gives_its_delivery_back() {
    let node = TestNode::setup(&["fib"])
        .config(|config| config.prefetch = 8)
        .start()
        .await;
    // More than the prefetch: a leaked delivery each would stop the module.
    let mut caller = RawClient::connect().await;
    const PANICS: usize = 20;
    for n in 0..PANICS {
        caller
            .publish(node.exchange(), "fib", b"10", panicking(&caller, n))
            .await;
    }
    for n in 0..10u32 {
        let reply = node.call("fib", n.to_string()).await;
        assert_eq!(reply.error, None, "an honest call after the panics");
    }
    // Each went back to its queue every time, counted by the broker, until
    // the delivery limit answered it poison: counted as 3.10 stamps it, not
    // as the caller's 99.
    for _ in 0..PANICS {
        let reply = caller
            .next_reply(Duration::from_secs(60))
            .await
            .expect("a request whose task panicked was never answered");
        assert_eq!(raw::error_header(&reply).as_deref(), Some("poison"));
        let body = raw::body(&reply);
        assert!(body.contains("took this request 5 times"), "{body}");
    }
    assert_eq!(node.call("fib", "20").await.body, b"6765");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_call_to_a_name_no_module_can_have_fails_in_the_guest() {
    let relay = std::fs::read(crate::support::guests::wasm("relay")).unwrap();
    let node = TestNode::setup(&["fib"])
        .file("relay.wasm", relay)
        .manifest("relay", "calls = [\"*\"]\n")
        .config(|config| config.prefetch = 8)
        .start()
        .await;
    let long = "a".repeat(300);
    let client = Arc::new(node.client().await);
    let calls: Vec<_> = (0..100)
        .map(|n| {
            let client = client.clone();
            let input = match n % 2 {
                0 => format!("{long};10"),
                _ => "Fib.Upper;10".to_owned(),
            };
            tokio::spawn(async move {
                client
                    .call("relay", input.as_bytes(), Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.unwrap();
        let body = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.error.as_deref(), Some("guest_error"), "{body}");
        assert!(body.contains("bad_request"), "{body}");
        assert!(body.len() < 400, "the name echoed whole: {body}");
    }
    // The prefetch is intact: every module still answers.
    for n in 0..10u32 {
        assert_eq!(node.call("fib", n.to_string()).await.error, None);
    }
    assert_eq!(node.call("relay", "fib;10").await.body, b"55");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_guest_writes_cannot_forge_a_log_line() {
    let exchange = unique("guestlog");
    let node = Spawn::new(&exchange, &["upcase"]).start().await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["upcase"]);
    let forged = "2026-12-01T00:00:00.000000Z ERROR wasmrpc: FORGED";
    let client = TestNode::client_for(&exchange).await;
    let reply = client
        .call(
            "upcase",
            format!("exit 1 oops\n{forged} by the guest").as_bytes(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(reply.error.is_some());
    let lines = tokio::task::spawn_blocking(move || node.lines_until("guest wrote to stderr", 1))
        .await
        .unwrap();
    let shown = lines.join("\n");
    assert!(
        !lines
            .iter()
            .any(|line| line.contains("FORGED") && !line.contains("\\n2026")),
        "a forged line:\n{shown}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains(&format!("\\n{forged} by the guest"))),
        "the guest's output is not in the log, escaped:\n{shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timestamp_a_request_cannot_have_is_not_a_queue_wait() {
    let node = TestNode::setup(&["fib"]).with_http().start().await;
    let addr = node.http.unwrap();
    let mut caller = RawClient::connect().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (n, stamp) in [0, now + 3600, now].into_iter().enumerate() {
        let properties = caller.request(&format!("stamp-{n}")).with_timestamp(stamp);
        caller
            .publish(node.exchange(), "fib", b"10", properties)
            .await;
        assert_eq!(
            raw::body(&caller.next_reply(Duration::from_secs(10)).await.unwrap()),
            "55"
        );
    }
    let fib = [("module", "fib")];
    let metrics = metrics_until(addr, |m| {
        m.get(
            "wasmrpc_requests_total",
            &[("module", "fib"), ("outcome", "ok")],
        ) == Some(3.0)
    })
    .await;
    // Only the stamp of now is a wait; 1970 and the future are not.
    assert_eq!(
        metrics.get("wasmrpc_queue_wait_seconds_count", &fib),
        Some(1.0)
    );
    assert!(metrics.get("wasmrpc_queue_wait_seconds_sum", &fib).unwrap() < 60.0);
}

/// A node serving `fib`, `flood`, `nap`, `sumfib` (allowed `fib`) and the
/// relays `a` and `b` (allowed anything), configured by `configure`.
fn calling_node(
    configure: impl FnOnce(&mut wasmrpc::node::NodeConfig),
) -> crate::support::node::Setup {
    let relay = std::fs::read(crate::support::guests::wasm("relay")).unwrap();
    let mut setup = TestNode::setup(&["fib", "flood", "nap", "sumfib"])
        .manifest("sumfib", "calls = [\"fib\"]\n")
        .config(configure);
    for name in ["a", "b"] {
        setup = setup
            .file(&format!("{name}.wasm"), relay.clone())
            .manifest(name, "calls = [\"*\"]\n");
    }
    setup
}

/// The kind and text of a reply that must be an error.
fn failure(reply: &wasmrpc::wire::reply::Reply) -> (String, String) {
    let kind = reply.error.clone().expect("an error reply");
    (kind, String::from_utf8_lossy(&reply.body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn what_one_request_causes_is_bounded_as_a_whole() {
    let node = calling_node(|config| config.children.max_tree_calls = 10)
        .start()
        .await;
    // 8 calls fit a budget of 10; each child gets a share of what is left
    // (0), so children that call on fail too_many.
    let reply = node.call("a", "*8,fib;5").await;
    assert_eq!(
        reply.error,
        None,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let (kind, body) = failure(&node.call("a", "*8,b,fib;5").await);
    assert_eq!(kind, "guest_error");
    assert!(
        body.contains("too_many") && body.contains("in all"),
        "{body}"
    );
    // A chain spends one a hop and hands the rest down; a caller may give
    // less than the node's budget, never more.
    let mut caller = RawClient::connect().await;
    for (budget, chain, answer) in [
        (3, "b,a,fib;10", Some("55")),
        (2, "b,a,fib;10", None),
        (1 << 40, "*8,b,fib;5", None),
    ] {
        let mut headers = FieldTable::default();
        headers.insert("x-wasmrpc-budget".into(), AMQPValue::LongLongInt(budget));
        let properties = caller.request(chain).with_headers(headers);
        caller
            .publish(node.exchange(), "a", chain.as_bytes(), properties)
            .await;
        let reply = caller.next_reply(Duration::from_secs(30)).await.unwrap();
        match answer {
            Some(answer) => assert_eq!(raw::body(&reply), answer),
            None => {
                assert_eq!(raw::error_header(&reply).as_deref(), Some("guest_error"));
                assert!(
                    raw::body(&reply).contains("too_many"),
                    "{}",
                    raw::body(&reply)
                );
            }
        }
    }
    // The bundled sumfib keeps to what a budget allows.
    let (kind, body) = failure(&node.call("sumfib", "90001..99999").await);
    assert_eq!(kind, "bad_request", "{body}");
    assert!(body.contains("256"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_is_told_the_reply_its_parent_can_take() {
    let node = calling_node(|_| {}).with_http().start().await;
    let addr = node.http.unwrap();
    // 64 children of 16 MB each: each may answer 1/64 of the parent's room.
    let (kind, body) = failure(&node.call("a", "*64,flood;16000000").await);
    assert_eq!(kind, "guest_error");
    assert!(
        body.contains("too_large") && body.contains("can take"),
        "{body}"
    );
    // The refusal happened at the child's node, counted as a reply limit.
    let metrics = metrics_until(addr, |m| {
        m.get(
            "wasmrpc_limits_tripped_total",
            &[("module", "flood"), ("limit", "reply_size")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(
        metrics
            .get(
                "wasmrpc_requests_total",
                &[("module", "flood"), ("outcome", "too_large")]
            )
            .is_some()
    );
    // One child of the same size fits, and is answered.
    let reply = node.call("a", "flood;16000000").await;
    assert_eq!((reply.error, reply.body.len()), (None, 16_000_000));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fan_out_attack_costs_a_node_little_memory() {
    let exchange = unique("fanout");
    let relay = std::fs::read(crate::support::guests::wasm("relay")).unwrap();
    let mut node = Spawn::new(&exchange, &["fib", "flood"])
        .binary("relay.wasm", relay)
        .file("relay.toml", "calls = [\"*\"]\n")
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib", "flood", "relay"]);
    let client = Arc::new(TestNode::client_for(&exchange).await);
    // Warm: every module has run once.
    for (module, input) in [("relay", "fib;10"), ("flood", "1000")] {
        let reply = client
            .call(module, input.as_bytes(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(reply.error, None);
    }
    let before = node.rss();
    let attacks: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call("relay", b"*64,flood;16000000", Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for attack in attacks {
        let reply = attack.await.unwrap();
        assert_eq!(reply.error.as_deref(), Some("guest_error"));
    }
    let grown = node.peak_rss().saturating_sub(before);
    eprintln!(
        "three fan-outs of 64 x 16 MB: peak RSS {} MiB above {} MiB",
        grown >> 20,
        before >> 20
    );
    assert!(
        grown < 512 << 20,
        "three fan-outs raised the node's peak memory by {} MiB",
        grown >> 20
    );
    let reply = client
        .call("fib", b"20", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.body, b"6765");
    assert!(node.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_calling_module_holds_more_than_half_the_waiting_parents() {
    let node = calling_node(|config| {
        config.concurrency = 1;
        config.children.max_waiting = 4;
    })
    .with_http()
    .start()
    .await;
    let addr = node.http.unwrap();
    let client = Arc::new(node.client().await);
    // Four parents of `a` whose children sleep: two wait, two are busy.
    let sleepers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call("a", b"nap;3000", Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Once two of them were refused (the other two wait), another calling
    // module is served.
    metrics_until(addr, |m| {
        m.get(
            "wasmrpc_child_calls_total",
            &[("module", "a"), ("outcome", "busy")],
        ) == Some(2.0)
    })
    .await;
    let reply = client
        .call("sumfib", b"1..30", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (reply.error, reply.body.as_slice()),
        (None, &b"2178308"[..])
    );
    let mut busy = 0;
    for sleeper in sleepers {
        let reply = sleeper.await.unwrap();
        match reply.error {
            None => assert_eq!(reply.body, b"slept for 3000 ms"),
            Some(_) => {
                let (_, body) = failure(&reply);
                assert!(body.contains("busy") && body.contains("half"), "{body}");
                busy += 1;
            }
        }
    }
    assert_eq!(busy, 2);
}
