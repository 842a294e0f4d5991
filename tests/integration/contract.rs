//! The wire contract, exercised by a client that knows only the RabbitMQ RPC
//! tutorial: an exclusive callback queue, `reply_to`, `correlation_id`. It is
//! written with lapin directly and shares no code with `wasmrpc::client`.

use std::collections::HashMap;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio_stream::StreamExt as _;

use crate::support::{TestNode, amqp_url, oracle};

/// The tutorial's client: a server-named exclusive queue for replies.
struct TutorialClient {
    _connection: Connection,
    channel: Channel,
    callback_queue: String,
    replies: Consumer,
}

impl TutorialClient {
    async fn connect() -> TutorialClient {
        let connection = Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let replies = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        TutorialClient {
            callback_queue: queue.name().as_str().to_owned(),
            _connection: connection,
            channel,
            replies,
        }
    }

    /// Publishes a request the way the tutorial does, optionally leaving out
    /// `reply_to` or `correlation_id`.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        reply_to: bool,
        correlation_id: Option<&str>,
    ) {
        let mut properties = BasicProperties::default();
        if reply_to {
            properties = properties.with_reply_to(self.callback_queue.as_str().into());
        }
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.into());
        }
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
    }

    async fn next_reply(&mut self, within: Duration) -> Option<Delivery> {
        match tokio::time::timeout(within, self.replies.next()).await {
            Ok(Some(delivery)) => Some(delivery.unwrap()),
            Ok(None) => panic!("the reply subscription ended"),
            Err(_) => None,
        }
    }
}

fn correlation_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(ShortString::as_str)
}

fn error_header(delivery: &Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from("x-error"))? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        other => panic!("x-error should be a string, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tutorial_client_calls_fib() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = TutorialClient::connect().await;
    client
        .publish(node.exchange(), "fib", b"30", true, Some("call-30"))
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
async fn a_module_no_node_serves_is_answered_not_found_within_a_second() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = TutorialClient::connect().await;
    client
        .publish(node.exchange(), "nosuchmodule", b"1", true, Some("lost"))
        .await;
    let reply = client
        .next_reply(Duration::from_secs(1))
        .await
        .expect("no not_found reply within a second");
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
    let mut client = TutorialClient::connect().await;
    for key in ["Fib", "fib.v2", "", "a b"] {
        client
            .publish(node.exchange(), key, b"1", true, Some(key))
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
    let mut client = TutorialClient::connect().await;
    let calls: HashMap<String, u32> = (0..200)
        .map(|i| (format!("call-{i}"), (i * 7) % 500))
        .collect();
    for (id, n) in &calls {
        client
            .publish(
                node.exchange(),
                "fib",
                n.to_string().as_bytes(),
                true,
                Some(id),
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
    let mut client = TutorialClient::connect().await;
    client
        .publish(node.exchange(), "fib", b"10", true, None)
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
    let mut client = TutorialClient::connect().await;
    client
        .publish(node.exchange(), "fib", b"20", false, Some("nobody"))
        .await;
    // The node still serves, and a request published after it is answered.
    client
        .publish(node.exchange(), "fib", b"21", true, Some("somebody"))
        .await;
    let reply = client
        .next_reply(Duration::from_secs(10))
        .await
        .expect("no reply");
    assert_eq!(
        (correlation_id(&reply), reply.data.as_slice()),
        (Some("somebody"), &b"10946"[..])
    );
    assert!(
        client
            .next_reply(Duration::from_millis(200))
            .await
            .is_none(),
        "nobody asked for a reply"
    );

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
