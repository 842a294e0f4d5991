//! Limits: each tripped limit is its own error, names itself and its value,
//! and comes from the module's manifest, the operator or the caller.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::support::TestNode;
use crate::support::http::metrics_until;
use crate::support::raw::{RawClient, body, correlation_id, error_header};

/// A request with the given headers, from `client`.
fn with_headers(
    client: &RawClient,
    id: &str,
    headers: &[(&str, AMQPValue)],
) -> lapin::BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert((*name).into(), value.clone());
    }
    client.request(id).with_headers(table)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tripped_limit_names_itself_and_its_value() {
    let node = TestNode::setup(&["forever", "bomb", "recurse", "flood", "fib"])
        .manifest("forever", "[limits]\ntime = \"200ms\"\n")
        .manifest("bomb", "[limits]\nmemory = \"16MiB\"\n")
        .manifest("recurse", "[limits]\nstack = \"256KiB\"\n")
        .manifest("flood", "[limits]\nreply = \"1KiB\"\n")
        .manifest("fib", "[limits]\nrequest = 16\n")
        .start()
        .await;
    let cases: [(&str, &[u8], &str, &str); 5] = [
        (
            "forever",
            b"",
            "timeout",
            "forever: ran longer than its time limit of 200 ms",
        ),
        (
            "bomb",
            b"",
            "memory",
            "bomb: needed more than its memory limit of 16 MiB",
        ),
        (
            "recurse",
            b"",
            "stack_overflow",
            "recurse: overflowed its wasm stack limit of 256 KiB",
        ),
        (
            "flood",
            b"1025",
            "too_large",
            "flood: reply of 1025 bytes is over the limit of 1 KiB",
        ),
        (
            "fib",
            b"00000000000000030",
            "too_large",
            "fib: request body of 17 bytes is over the limit of 16 bytes",
        ),
    ];
    let mut client = RawClient::connect().await;
    for (module, input, kind, message) in cases {
        let reply = client.call(node.exchange(), module, input).await;
        assert_eq!(
            (error_header(&reply).as_deref(), body(&reply).as_str()),
            (Some(kind), message)
        );
    }
    // Within its limits, the same module answers.
    let reply = client.call(node.exchange(), "fib", b"30").await;
    assert_eq!(
        (error_header(&reply), body(&reply)),
        (None, "832040".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_limits_apply_where_no_manifest_speaks() {
    let node = TestNode::setup(&["forever", "spin"])
        .manifest("spin", "[limits]\ntime = \"150ms\"\n")
        .config(|config| config.limits.time = Duration::from_millis(300))
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let reply = client.call(node.exchange(), "forever", b"").await;
    assert_eq!(
        body(&reply),
        "forever: ran longer than its time limit of 300 ms"
    );
    let reply = client.call(node.exchange(), "spin", b"2000").await;
    assert_eq!(
        body(&reply),
        "spin: ran longer than its time limit of 150 ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_reply_limit_is_above_what_the_broker_accepts() {
    // The operator says the broker takes messages of 64 KiB at most: the
    // node's own reply limit and a manifest's larger one are both held to it.
    let node = TestNode::setup(&["flood", "fib"])
        .manifest("flood", "[limits]\nreply = \"1MiB\"\n")
        .config(|config| config.max_message = 64 << 10)
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let reply = client.call(node.exchange(), "flood", b"65537").await;
    assert_eq!(error_header(&reply).as_deref(), Some("too_large"));
    assert_eq!(
        body(&reply),
        "flood: reply of 65537 bytes is over the limit of 64 KiB"
    );
    let reply = client.call(node.exchange(), "flood", b"65536").await;
    assert_eq!((error_header(&reply), reply.data.len()), (None, 65536));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_is_answered_within_100_ms_of_the_limit() {
    let node = TestNode::setup(&["forever"])
        .manifest("forever", "[limits]\ntime = \"300ms\"\n")
        .with_http()
        .start()
        .await;
    let mut client = RawClient::connect().await;
    for _ in 0..3 {
        let started = Instant::now();
        let reply = client.call(node.exchange(), "forever", b"").await;
        let elapsed = started.elapsed();
        assert_eq!(error_header(&reply).as_deref(), Some("timeout"));
        // Seen from here, the broker's round trips and a busy machine
        // add what they add; the guest's own time is the node's to say.
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    }
    // The node's measure of each run: the guest was stopped within 100 ms
    // of its limit (an epoch tick is 10 ms), on average over the three.
    let forever = [("module", "forever")];
    let metrics = metrics_until(node.http.unwrap(), |m| {
        m.get("wasmrpc_run_seconds_count", &forever) == Some(3.0)
    })
    .await;
    let mean = metrics.get("wasmrpc_run_seconds_sum", &forever).unwrap() / 3.0;
    assert!(
        (0.3..0.4).contains(&mean),
        "a 300 ms limit stopped the guest after {mean} s"
    );
    // And none ran past the bucket that holds 400 ms.
    let buckets = metrics.all("wasmrpc_run_seconds_bucket");
    let within = buckets
        .iter()
        .filter(|(labels, _)| labels.get("module").map(String::as_str) == Some("forever"))
        .filter(|(labels, _)| {
            labels
                .get("le")
                .and_then(|le| le.parse::<f64>().ok())
                .is_some_and(|le| le <= 0.5)
        })
        .map(|(_, count)| *count)
        .fold(0.0, f64::max);
    assert_eq!(within, 3.0, "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_body_limit_is_checked_before_any_wasm_runs() {
    // If `forever` ran at all, the reply would be a timeout, 10 s later.
    let node = TestNode::setup(&["forever"])
        .manifest("forever", "[limits]\nrequest = 8\ntime = \"10s\"\n")
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let reply = client.call(node.exchange(), "forever", b"123456789").await;
    assert_eq!(error_header(&reply).as_deref(), Some("too_large"));
    assert_eq!(
        body(&reply),
        "forever: request body of 9 bytes is over the limit of 8 bytes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_can_shorten_the_time_limit_but_not_lengthen_it() {
    let node = TestNode::setup(&["forever"])
        .manifest("forever", "[limits]\ntime = \"800ms\"\n")
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let shorter = with_headers(
        &client,
        "shorter",
        &[("x-timeout-ms", AMQPValue::LongUInt(150))],
    );
    client
        .publish(node.exchange(), "forever", b"", shorter)
        .await;
    let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(correlation_id(&reply), Some("shorter"));
    assert_eq!(error_header(&reply).as_deref(), Some("timeout"));
    // 150 ms from when the node took it; a little less from when it started.
    let message = body(&reply);
    assert!(
        message.starts_with("forever: ran past the caller's deadline, 1")
            && message.ends_with(" ms after it started"),
        "{message}"
    );

    // A string of digits works too, as some clients can only send strings.
    let longer = with_headers(
        &client,
        "longer",
        &[(
            "x-timeout-ms",
            AMQPValue::LongString(LongString::from("60000")),
        )],
    );
    client
        .publish(node.exchange(), "forever", b"", longer)
        .await;
    let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(correlation_id(&reply), Some("longer"));
    assert_eq!(
        body(&reply),
        "forever: ran longer than its time limit of 800 ms"
    );

    let deadline = AMQPValue::LongLongInt(unix_ms() + 200);
    let absolute = with_headers(&client, "absolute", &[("x-deadline", deadline)]);
    client
        .publish(node.exchange(), "forever", b"", absolute)
        .await;
    let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(correlation_id(&reply), Some("absolute"));
    assert!(
        body(&reply).starts_with("forever: ran past the caller's deadline"),
        "{}",
        body(&reply)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_deadline_has_passed_is_answered_timeout_without_running() {
    let node = TestNode::setup(&["spin"])
        .config(|config| config.concurrency = 1)
        .start()
        .await;
    let mut client = RawClient::connect().await;

    // Already past when it arrives.
    let late = with_headers(
        &client,
        "late",
        &[("x-deadline", AMQPValue::LongLongInt(unix_ms() - 5_000))],
    );
    client.publish(node.exchange(), "spin", b"1", late).await;
    let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_header(&reply).as_deref(), Some("timeout"));
    assert!(
        body(&reply).starts_with("spin: the caller's deadline passed"),
        "{}",
        body(&reply)
    );

    // Past by the time spin may start another request: with concurrency 1
    // it may have 2 in progress (half of 4 instances), both busy for 600 ms.
    for busy in ["busy-1", "busy-2"] {
        client
            .publish(node.exchange(), "spin", b"600", client.request(busy))
            .await;
    }
    node.running(2).await;
    let impatient = with_headers(
        &client,
        "impatient",
        &[("x-timeout-ms", AMQPValue::LongUInt(100))],
    );
    client
        .publish(node.exchange(), "spin", b"1", impatient)
        .await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
        replies.push((
            correlation_id(&reply).unwrap().to_owned(),
            error_header(&reply),
            body(&reply),
        ));
    }
    replies.sort();
    for (i, busy) in ["busy-1", "busy-2"].into_iter().enumerate() {
        assert_eq!(replies[i], (busy.into(), None, "spun for 600 ms".into()));
    }
    assert_eq!(replies[2].0, "impatient");
    assert_eq!(replies[2].1.as_deref(), Some("timeout"), "{:?}", replies[2]);
    assert!(
        replies[2].2.contains("before the request could start"),
        "{:?}",
        replies[2]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_deadline_headers_are_bad_requests() {
    let node = TestNode::start(&["fib"]).await;
    let mut client = RawClient::connect().await;
    let cases = [
        (
            "x-timeout-ms",
            AMQPValue::LongString(LongString::from("soon")),
        ),
        ("x-timeout-ms", AMQPValue::LongInt(-5)),
        ("x-timeout-ms", AMQPValue::LongUInt(0)),
        ("x-deadline", AMQPValue::Boolean(true)),
    ];
    for (name, value) in cases {
        let properties = with_headers(&client, name, &[(name, value.clone())]);
        client
            .publish(node.exchange(), "fib", b"10", properties)
            .await;
        let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            error_header(&reply).as_deref(),
            Some("bad_request"),
            "{name} = {value:?}"
        );
        assert!(body(&reply).contains(name), "{}", body(&reply));
        // The value as its sender wrote it, not as an AMQP type.
        assert!(!body(&reply).contains("LongString"), "{}", body(&reply));
    }
    let properties = with_headers(
        &client,
        "abc",
        &[(
            "x-timeout-ms",
            AMQPValue::LongString(LongString::from("abc")),
        )],
    );
    client
        .publish(node.exchange(), "fib", b"10", properties)
        .await;
    let reply = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        body(&reply),
        "fib: header x-timeout-ms must be a non-negative integer, got \"abc\""
    );
}
