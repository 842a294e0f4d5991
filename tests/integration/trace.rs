//! W3C trace context: a caller's `traceparent` comes back on the reply, in
//! the same trace, as the node's span; a malformed one changes nothing.

use lapin::types::{AMQPValue, FieldTable, LongString};
use wasmrpc::client::CallOptions;
use wasmrpc::trace::TraceParent;

use crate::support::TestNode;
use crate::support::node::REPLY_TIMEOUT;
use crate::support::raw::{RawClient, body, error_header, header_string};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn with_trace(client: &RawClient, id: &str, traceparent: &str) -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(LongString::from("vendor=opaque")),
    );
    client.request(id).with_headers(headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_comes_back_in_the_same_trace() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    client
        .publish(
            node.exchange(),
            "fib",
            b"20",
            with_trace(&client, "t", PARENT),
        )
        .await;
    let reply = client.next_reply(REPLY_TIMEOUT).await.expect("no reply");
    assert_eq!(body(&reply), "6765");
    let answered: TraceParent = header_string(&reply, "traceparent")
        .expect("a traceparent on the reply")
        .parse()
        .expect("a valid traceparent");
    let sent: TraceParent = PARENT.parse().unwrap();
    assert_eq!(answered.trace_id(), sent.trace_id());
    assert_ne!(answered.span_id(), sent.span_id(), "the node's own span");
    assert_eq!(
        header_string(&reply, "tracestate").as_deref(),
        Some("vendor=opaque")
    );

    // Errors are traced as well.
    client
        .publish(
            node.exchange(),
            "fib",
            b"x",
            with_trace(&client, "e", PARENT),
        )
        .await;
    let reply = client.next_reply(REPLY_TIMEOUT).await.expect("no reply");
    assert_eq!(error_header(&reply).as_deref(), Some("bad_request"));
    assert!(header_string(&reply, "traceparent").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_traceparent_is_ignored() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    for (id, bad) in [
        (
            "upper",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        ),
        ("short", "00-4bf92f35-00f067aa0ba902b7-01"),
        (
            "zeros",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ),
        ("junk", "\u{1F980}"),
    ] {
        client
            .publish(node.exchange(), "fib", b"10", with_trace(&client, id, bad))
            .await;
        let reply = client.next_reply(REPLY_TIMEOUT).await.expect("no reply");
        assert_eq!(body(&reply), "55", "{id}");
        assert_eq!(error_header(&reply), None, "{id}");
        assert_eq!(header_string(&reply, "traceparent"), None, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_sends_a_trace_and_reads_the_answer() {
    let node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let trace = TraceParent::new_trace();
    let options = CallOptions {
        traceparent: Some(trace),
        ..CallOptions::default()
    };
    let reply = client
        .call_with("fib", b"10", REPLY_TIMEOUT, &options)
        .await
        .unwrap();
    let answered: TraceParent = reply.traceparent.unwrap().parse().unwrap();
    assert_eq!(answered.trace_id(), trace.trace_id());
    // Without one, none comes back.
    let reply = client.call("fib", b"10", REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.traceparent, None);
}
