//! The bundled Fibonacci module, called over the broker.

use wasmrpc::wire::ErrorKind;

use crate::support::{TestNode, oracle};

#[tokio::test(flavor = "multi_thread")]
async fn fib_answers_exactly() {
    let mut node = TestNode::start(&["fib"]).await;
    let client = node.client().await;
    let timeout = crate::support::node::REPLY_TIMEOUT;
    for n in [0u32, 1, 2, 3, 10, 30, 92, 93, 94, 186, 187, 1000] {
        let reply = client
            .call("fib", n.to_string().as_bytes(), timeout)
            .await
            .expect("no reply");
        assert_eq!(
            reply.error,
            None,
            "fib({n}) failed: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(
            String::from_utf8(reply.body).unwrap(),
            oracle::fib_decimal(n),
            "fib({n})"
        );
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fib_answers_the_documented_values() {
    let mut node = TestNode::start(&["fib"]).await;
    let expect = [
        ("0", "0"),
        ("1", "1"),
        ("30", "832040"),
        ("93", "12200160415121876738"),
        // Surrounding whitespace is ignored, so `echo 30 |` works.
        (" 30\n", "832040"),
    ];
    for (input, output) in expect {
        let reply = node.call("fib", input).await;
        assert_eq!(
            (reply.error.as_deref(), reply.body.as_slice()),
            (None, output.as_bytes()),
            "fib({input:?})"
        );
    }
    let thousand = node.call("fib", "1000").await.body;
    assert_eq!(thousand.len(), 209, "fib(1000) has 209 digits");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fib_of_the_largest_n_is_exact() {
    let mut node = TestNode::start(&["fib"]).await;
    let n = 100_000;
    let reply = node.call("fib", n.to_string()).await;
    assert_eq!(reply.error, None);
    let digits = String::from_utf8(reply.body).unwrap();
    assert_eq!(digits.len(), oracle::fib_digit_count(n));
    let last: u64 = digits[digits.len() - 18..].parse().unwrap();
    assert_eq!(last, oracle::fib_last_digits(n));
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fib_refuses_bad_arguments_with_a_clear_message() {
    let mut node = TestNode::start(&["fib"]).await;
    let cases: [(&[u8], &str); 8] = [
        (b"abc", "\"abc\""),
        (b"-1", "must not be negative"),
        (b"1.5", "\"1.5\""),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"100001", "at most 100000"),
        (b"99999999999999999999", "at most 100000"),
        (b"\xff\xfe", "not UTF-8"),
    ];
    for (input, mentions) in cases {
        let reply = node.call("fib", input).await;
        let message = String::from_utf8_lossy(&reply.body);
        assert_eq!(
            reply.error_kind(),
            Some(ErrorKind::BadRequest),
            "{input:?} gave {message:?}"
        );
        assert!(message.starts_with("fib: "), "{message:?} names the module");
        assert!(
            message.contains(mentions),
            "{message:?} should mention {mentions:?}"
        );
    }
    node.stop().await.unwrap();
}
