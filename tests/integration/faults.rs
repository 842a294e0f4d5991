//! The node outlives its broker: connections cut or stalled, a broker
//! restarted or not up yet, a list of brokers of which one is gone, replies
//! the broker refuses. Real node processes, real RabbitMQ; the faults are
//! made with a proxy of the test's own between node and broker, or on a
//! private broker the test starts. Nothing here stops or reconfigures the
//! broker the other tests share.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use wasmrpc::amqp::Brokers;
use wasmrpc::client::Client;
use wasmrpc::wire::{ErrorKind, Topology};

use crate::support::broker::PrivateBroker;
use crate::support::node::Cleanup;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::proxy::Proxy;
use crate::support::raw::RawClient;
use crate::support::stream::{CallStream, Outcome, summary};
use crate::support::{amqp_url, brokers, oracle, unique};

/// How long a caller in these tests waits for a reply: longer than any
/// fault lasts, so that a request waiting in its queue meanwhile is answered.
const PATIENT: Duration = Duration::from_secs(60);

/// Waits, off the async runtime, until `node` logs a line with `needle`.
async fn log_line(
    node: NodeProcess,
    needle: &'static str,
    within: Duration,
) -> (NodeProcess, String) {
    tokio::task::spawn_blocking(move || {
        let line = node.wait_for_line_within(needle, within);
        (node, line)
    })
    .await
    .unwrap()
}

fn parse(url: &str) -> Brokers {
    url.parse().unwrap()
}

/// Twenty calls of `fib`, each answered right.
async fn answers_fib(client: &Client) {
    for n in 0..20u32 {
        let reply = client
            .call("fib", n.to_string().as_bytes(), PATIENT)
            .await
            .unwrap();
        assert_eq!(reply.error, None, "fib({n})");
        assert_eq!(reply.body, oracle::fib_decimal(n).as_bytes(), "fib({n})");
    }
}

/// A node serving `fib` on `exchange` through the broker(s) at `url`, and a
/// client that reaches the tests' broker directly, checked with one call.
async fn serving(exchange: &str, url: &str) -> (NodeProcess, Client) {
    let node = Spawn::new(exchange, &["fib"]).url(url).start().await;
    let client = Client::connect(&brokers(), exchange).await.unwrap();
    let reply = client.call("fib", b"10", PATIENT).await.unwrap();
    assert_eq!((reply.error, reply.body), (None, b"55".to_vec()));
    (node, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_rides_through_a_cut_connection() {
    let exchange = unique("cut");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let proxy = Proxy::start(&amqp_url()).await;
    let mut node = Spawn::new(&exchange, &["fib"])
        .url(&proxy.url())
        .start()
        .await;
    // The callers reach the broker directly: only the node is cut off.
    let stream = CallStream::start(brokers(), &exchange, 4, PATIENT);
    stream.answered(20, Duration::from_secs(10)).await;

    proxy.cut();
    // The fault lasts 3 s: a network blip, not a condition to await.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        node.is_running(),
        "the node exited when its connection was cut"
    );
    proxy.restore();
    let restored = Instant::now();
    stream.answered(40, Duration::from_secs(20)).await;
    let calls = stream.finish().await;

    assert!(node.is_running(), "the node exited after the cut");
    let back = calls
        .iter()
        .filter(|call| call.outcome == Outcome::Right && call.done > restored)
        .map(|call| call.done - restored)
        .min()
        .expect("no call answered after the restore");
    assert!(
        back <= Duration::from_secs(5),
        "the node served again only {back:?} after the restore"
    );
    // Calls made during the cut waited in their queue; calls the node held
    // when it was cut went back there. Every one was answered, and right.
    assert!(
        calls.iter().all(|call| call.outcome == Outcome::Right),
        "{}",
        summary(&calls)
    );
    eprintln!(
        "cut for 3 s: serving again {back:?} after the restore; {}",
        summary(&calls)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_resumes_by_itself_after_its_broker_restarts() {
    let mut broker = PrivateBroker::start(&[]).await;
    let exchange = unique("restart");
    let mut node = Spawn::new(&exchange, &["fib"])
        .url(&broker.url())
        .start()
        .await;
    let stream = CallStream::start(parse(&broker.url()), &exchange, 4, PATIENT);
    stream.answered(20, Duration::from_secs(10)).await;

    broker.stop().await;
    assert!(node.is_running(), "the node exited when its broker stopped");
    broker.start_again().await;
    let restarted = Instant::now();
    stream.answered(40, Duration::from_secs(30)).await;
    let calls = stream.finish().await;

    assert!(
        node.is_running(),
        "the node exited after its broker restarted"
    );
    // Calls in flight when the broker stopped died with their callers'
    // connections; every call made once it was back was answered, and right.
    let after: Vec<_> = calls
        .iter()
        .filter(|call| call.issued > restarted)
        .cloned()
        .collect();
    assert!(
        after.iter().all(|call| call.outcome == Outcome::Right),
        "after the restart: {}",
        summary(&after)
    );
    assert!(
        !calls
            .iter()
            .any(|call| matches!(call.outcome, Outcome::Wrong(_))),
        "{}",
        summary(&calls)
    );
    let back = after
        .iter()
        .map(|call| call.done - restarted)
        .min()
        .unwrap();
    eprintln!(
        "broker restarted: first answer {back:?} after it was back; {}",
        summary(&calls)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_started_before_its_broker_serves_once_it_is_up() {
    let mut broker = PrivateBroker::new(&[]);
    let exchange = unique("early");
    let node = Spawn::new(&exchange, &["fib"])
        .url(&broker.url())
        .launch()
        .await;
    let (mut node, waiting) =
        log_line(node, "waiting for the broker", Duration::from_secs(30)).await;
    assert!(waiting.contains("attempt=1"), "{waiting}");
    // The broker comes up 5 s later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(node.is_running(), "the node gave up waiting for its broker");
    broker.start_again().await;
    let up = Instant::now();
    let (node, ready) = log_line(node, "node ready", Duration::from_secs(10)).await;
    assert!(ready.contains("session=1"), "{ready}");
    eprintln!(
        "broker up 5 s after the node: serving {:?} later",
        up.elapsed()
    );

    let client = Client::connect(&parse(&broker.url()), &exchange)
        .await
        .unwrap();
    let reply = client.call("fib", b"30", PATIENT).await.unwrap();
    assert_eq!((reply.error, reply.body), (None, b"832040".to_vec()));
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_over_the_brokers_message_size_is_answered_too_large() {
    // The node is not told: it believes the default of 16 MiB.
    let broker = PrivateBroker::start(&["max_message_size = 1048576"]).await;
    let exchange = unique("toolarge");
    let node = Spawn::new(&exchange, &["flood", "fib"])
        .url(&broker.url())
        .start()
        .await;
    let client = Client::connect(&parse(&broker.url()), &exchange)
        .await
        .unwrap();

    for _ in 0..2 {
        let reply = client.call("flood", b"2000000", PATIENT).await.unwrap();
        let message = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.error_kind(), Some(ErrorKind::TooLarge), "{message}");
        assert_eq!(
            message,
            "flood: reply of 2000000 bytes is over the broker's message size limit of 1048576 bytes"
        );
    }
    // The reply path reopened by itself: every later call is answered.
    let reply = client.call("flood", b"1048576", PATIENT).await.unwrap();
    assert_eq!((reply.error, reply.body.len()), (None, 1_048_576));
    answers_fib(&client).await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_to_the_broker_would_refuse_costs_no_node_and_no_dead_letter() {
    let exchange = unique("badreply");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let topology = Topology::new(&exchange);
    let spawn = Spawn::new(&exchange, &["fib"]);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(spawn.clone().start().await);
    }

    // RabbitMQ 3.10 closes the publisher's whole connection over a reply to
    // a malformed direct reply-to name, or to a well-formed one naming a
    // broker node it does not know.
    let raw = RawClient::connect().await;
    let names = [
        "amq.rabbitmq.reply-to.AAAA.key".to_owned(),
        crate::support::raw::direct_reply_to_for_node("reply@1234567"),
    ];
    for name in &names {
        let properties = BasicProperties::default()
            .with_reply_to(name.as_str().into())
            .with_correlation_id("refused".into());
        for (exchange, routing_key, body) in [
            (topology.exchange().to_owned(), "fib", "10"),
            (topology.control_exchange(), "", "status"),
        ] {
            raw.channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties.clone(),
                )
                .await
                .unwrap();
        }
    }

    // Each request is acked unanswered by the node that took it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut acked = 0;
    while acked < names.len() {
        assert!(Instant::now() < deadline, "{acked} refused replies acked");
        for node in &nodes {
            acked += node
                .unread_log()
                .iter()
                .filter(|line| line.contains("acking the request unanswered"))
                .count();
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every node still serves: each answers the fleet, and calls are answered.
    let client = Client::connect(&brokers(), &exchange).await.unwrap();
    let fleet = client.fleet(Duration::from_secs(2)).await.unwrap();
    assert_eq!(fleet.len(), 3, "{fleet:?}");
    answers_fib(&client).await;
    for node in &mut nodes {
        assert!(node.is_running(), "a node exited");
    }
    // Nothing cycles, and nothing became a dead letter.
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [
        topology.module_queue(&"fib".parse().unwrap()),
        topology.dead_queue(),
    ] {
        let declared = raw
            .channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await
            .unwrap();
        assert_eq!(declared.message_count(), 0, "{queue}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_connection_is_noticed_within_the_heartbeat_bound_and_recovered() {
    let exchange = unique("stall");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let proxy = Proxy::start(&amqp_url()).await;
    let (node, client) = serving(&exchange, &proxy.url()).await;

    proxy.stall();
    let stalled = Instant::now();
    let (mut node, lost) = log_line(node, "lost the broker", Duration::from_secs(30)).await;
    let noticed = stalled.elapsed();
    // Two heartbeat intervals of silence, checked every half interval:
    // 12.5 s with the default 5 s heartbeat; a little slack for the machine.
    assert!(
        noticed <= Duration::from_secs(14),
        "the stall was noticed only after {noticed:?}: {lost}"
    );
    assert!(node.is_running());
    proxy.restore();
    let restored = Instant::now();
    let reply = client.call("fib", b"30", PATIENT).await.unwrap();
    assert_eq!((reply.error, reply.body), (None, b"832040".to_vec()));
    eprintln!(
        "stall noticed after {noticed:?}; serving again {:?} after the restore",
        restored.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_fails_over_to_the_next_broker_of_its_list() {
    let exchange = unique("failover");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let first = Proxy::start(&amqp_url()).await;
    let second = Proxy::start(&amqp_url()).await;
    let (node, client) = serving(&exchange, &format!("{},{}", first.url(), second.url())).await;

    // The first broker is gone for good.
    first.cut();
    let (node, ready) = log_line(node, "node ready", Duration::from_secs(10)).await;
    assert!(ready.contains("session=2"), "{ready}");
    let port = url::Url::parse(&second.url()).unwrap().port().unwrap();
    assert!(
        ready.contains(&format!(":{port}/")),
        "not on the second broker: {ready}"
    );
    assert_eq!(
        client.call("fib", b"30", PATIENT).await.unwrap().body,
        b"832040"
    );
    drop(node);
}
