//! The wire contract, exercised by a client that knows only the RabbitMQ RPC
//! tutorial (`support::raw`).

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::support::node::REPLY_TIMEOUT;
use crate::support::raw::{RawClient, correlation_id, error_header};
use crate::support::{TestNode, oracle};

#[tokio::test(flavor = "multi_thread")]
async fn a_tutorial_client_calls_fib() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    client
        .publish(node.exchange(), "fib", b"30", client.request("call-30"))
        .await;
    let reply = client
        .next_reply(Duration::from_secs(10))
        .await
        .expect("no reply");
    assert_eq!(correlation_id(&reply), Some("call-30"));
    assert_eq!(error_header(&reply), None);
    assert_eq!(reply.data, b"832040");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_no_node_serves_is_answered_not_found_at_once() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    client
        .publish(
            node.exchange(),
            "nosuchmodule",
            b"1",
            client.request("lost"),
        )
        .await;
    // Answered by a node, not dropped when the unrouted queue's TTL runs
    // out (a minute): how fast depends on the machine, so the bound is
    // that of any reply, far below the TTL.
    let reply = client
        .next_reply(REPLY_TIMEOUT)
        .await
        .expect("no not_found reply");
    assert_eq!(correlation_id(&reply), Some("lost"));
    assert_eq!(error_header(&reply).as_deref(), Some("not_found"));
    assert_eq!(
        String::from_utf8_lossy(&reply.data),
        "no node serves module \"nosuchmodule\""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routing_key_that_is_not_a_module_name_is_a_bad_request() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    for key in ["Fib", "fib.v2", "", "a b"] {
        client
            .publish(node.exchange(), key, b"1", client.request(key))
            .await;
        let reply = client
            .next_reply(Duration::from_secs(10))
            .await
            .expect("no reply");
        assert_eq!(correlation_id(&reply), Some(key));
        assert_eq!(
            error_header(&reply).as_deref(),
            Some("bad_request"),
            "routing key {key:?}"
        );
        assert!(String::from_utf8_lossy(&reply.data).contains("not a valid module name"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_calls_each_get_their_own_answer() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    let calls: HashMap<String, u32> = (0..200)
        .map(|i| (format!("call-{i}"), (i * 7) % 500))
        .collect();
    for (id, n) in &calls {
        client
            .publish(
                node.exchange(),
                "fib",
                n.to_string().as_bytes(),
                client.request(id),
            )
            .await;
    }
    let mut answered = HashMap::new();
    while answered.len() < calls.len() {
        let reply = client
            .next_reply(Duration::from_secs(30))
            .await
            .expect("a call went unanswered");
        let id = correlation_id(&reply)
            .expect("a reply without correlation id")
            .to_owned();
        let n = calls[&id];
        assert_eq!(error_header(&reply), None, "fib({n})");
        assert_eq!(
            String::from_utf8(reply.data).unwrap(),
            oracle::fib_decimal(n),
            "fib({n}) for {id}"
        );
        assert!(
            answered.insert(id.clone(), n).is_none(),
            "{id} answered twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_correlation_id_is_answered_without_one() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    let no_correlation_id =
        BasicProperties::default().with_reply_to(client.callback_queue.as_str().into());
    client
        .publish(node.exchange(), "fib", b"10", no_correlation_id)
        .await;
    let reply = client
        .next_reply(Duration::from_secs(10))
        .await
        .expect("no reply");
    assert_eq!(correlation_id(&reply), None);
    assert_eq!(reply.data, b"55");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_reply_to_is_dropped_and_never_redelivered() {
    let mut node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    let no_reply_to = BasicProperties::default().with_correlation_id("nobody".into());
    client
        .publish(node.exchange(), "fib", b"20", no_reply_to)
        .await;
    // The node still serves, and a request published after it is answered.
    client
        .publish(node.exchange(), "fib", b"21", client.request("somebody"))
        .await;
    let reply = client
        .next_reply(Duration::from_secs(10))
        .await
        .expect("no reply");
    assert_eq!(
        (correlation_id(&reply), reply.data.as_slice()),
        (Some("somebody"), &b"10946"[..])
    );
    // That no reply went anywhere cannot be seen (there is nowhere to
    // send one); that the request was settled can.

    // Stopping the node returns whatever it had not acked to the queue: the
    // queue is empty only if the request without reply_to was acked.
    node.stop().await.unwrap();
    let queue = node.topology.module_queue(&"fib".parse().unwrap());
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = client
        .channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        declared.message_count(),
        0,
        "the request without reply_to went back to the queue"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn classic_queues_an_earlier_version_declared_are_served_as_they_are() {
    // wasmrpc 0.1 declared the unrouted and dead-letter queues as classic
    // queues; quorum queues are replicated, but a queue's type cannot change.
    let exchange = crate::support::unique("upgrade");
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib"]);
    let topology = wasmrpc::wire::Topology::new(&exchange);
    let client = RawClient::connect().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut ttl = FieldTable::default();
    ttl.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongUInt(wasmrpc::wire::UNROUTED_TTL_MS),
    );
    for (queue, arguments) in [
        (topology.unrouted_queue(), ttl),
        (topology.dead_queue(), FieldTable::default()),
    ] {
        client
            .channel
            .queue_declare(queue.as_str().into(), durable, arguments)
            .await
            .unwrap();
    }

    let node = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    assert_eq!(node.call("fib", "20").await.body, b"6765");
    let reply = node.call("nosuchmodule", "1").await;
    assert_eq!(reply.error.as_deref(), Some("not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_say_what_they_are_who_sent_them_and_when() {
    let node = TestNode::setup(&["fib", "spin"])
        .manifest("fib", "content_type = \"application/json\"\n")
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let content_type = |reply: &lapin::message::Delivery| {
        reply
            .properties
            .content_type()
            .as_ref()
            .map(|value| value.to_string())
    };

    let fib = client.call(node.exchange(), "fib", b"10").await;
    let spin = client.call(node.exchange(), "spin", b"1").await;
    let failed = client.call(node.exchange(), "fib", b"ten").await;
    assert_eq!(content_type(&fib).as_deref(), Some("application/json"));
    assert_eq!(
        content_type(&spin).as_deref(),
        Some("application/octet-stream"),
        "the default, without a manifest"
    );
    assert_eq!(error_header(&failed).as_deref(), Some("bad_request"));
    assert_eq!(
        content_type(&failed).as_deref(),
        Some("text/plain; charset=utf-8")
    );
    for reply in [&fib, &spin, &failed] {
        assert_eq!(
            reply.properties.app_id().as_ref().map(|id| id.as_str()),
            Some("wasmrpc")
        );
        let stamp = reply.properties.timestamp().expect("a timestamp");
        assert!(stamp.abs_diff(now) <= 60, "timestamp {stamp}, now {now}");
    }
}
