//! A request that kills every node that runs it does not circulate forever:
//! after the delivery limit its caller is told and it waits in the
//! dead-letter queue for an operator.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use wasmrpc::wire::Topology;

use crate::support::node::Cleanup;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::raw::{RawClient, body, correlation_id, error_header};
use crate::support::{TestNode, unique};

async fn start_node(exchange: &str) -> NodeProcess {
    Spawn::new(exchange, &["spin"])
        .env("WASMRPC_DELIVERY_LIMIT", "2")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_keeps_killing_nodes_is_dead_lettered_and_answered_poison() {
    let exchange = unique("poison");
    let _cleanup = Cleanup::new(&exchange, &["spin"]);
    let topology = Topology::new(&exchange);
    let mut node = start_node(&exchange).await;
    let mut client = RawClient::connect().await;
    client
        .publish(&exchange, "spin", b"30000", client.request("deadly"))
        .await;

    // Twice, a node takes the request and dies running it.
    for _ in 0..2 {
        node = tokio::task::spawn_blocking(move || {
            node.wait_for_line("running");
            node.signal("KILL");
            node.child.wait().unwrap();
            node
        })
        .await
        .unwrap();
        drop(node);
        node = start_node(&exchange).await;
    }

    // The third node refuses to run it and says why.
    let reply = client
        .next_reply(Duration::from_secs(30))
        .await
        .expect("the caller was never told");
    assert_eq!(correlation_id(&reply), Some("deadly"));
    assert_eq!(error_header(&reply).as_deref(), Some("poison"));
    let message = body(&reply);
    assert!(message.contains("took this request 2 times"), "{message}");
    assert!(message.contains(&topology.dead_queue()), "{message}");

    // The node rejects it just after replying: wait for it to arrive.
    let dead = client
        .next_in(&topology.dead_queue(), Duration::from_secs(10))
        .await;
    assert_eq!(dead.delivery.data, b"30000");
    let headers = dead.delivery.properties.headers().as_ref().unwrap();
    assert_eq!(
        headers
            .inner()
            .get(&ShortString::from("x-first-death-reason")),
        Some(&AMQPValue::LongString("rejected".into()))
    );

    // The node that refused it serves on.
    let reply = client.call(&exchange, "spin", b"1").await;
    assert_eq!(body(&reply), "spun for 1 ms");
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_disagree_on_the_delivery_limit_say_so() {
    let exchange = unique("disagree");
    let setup = |limit| {
        TestNode::setup(&["fib"])
            .exchange(&exchange)
            .config(move |config| config.delivery_limit = limit)
    };
    let first = setup(3).start().await;
    assert_eq!(first.call("fib", "7").await.body, b"13");

    let second = setup(4).try_start().await;
    let error = format!(
        "{:#}",
        second
            .err()
            .expect("a node with another delivery limit started")
    );
    assert!(
        error.contains("must use the same --delivery-limit"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_count_sent_by_the_caller_is_not_believed() {
    // RabbitMQ 3.10 leaves a caller's own x-delivery-count on a first
    // delivery; only the broker's count on a redelivery may make it poison.
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(99));
    let properties = client.request("forged").with_headers(headers);
    client
        .publish(node.exchange(), "fib", b"10", properties)
        .await;
    let reply = client
        .next_reply(Duration::from_secs(10))
        .await
        .expect("no reply");
    assert_eq!(correlation_id(&reply), Some("forged"));
    assert_eq!(
        (error_header(&reply), body(&reply)),
        (None, "55".to_owned())
    );
}
