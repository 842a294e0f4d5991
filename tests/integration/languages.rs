//! Guests written in Python (componentize-py), JavaScript (componentize-js)
//! and C (clang with wasi-libc, a plain WASI program), each answered
//! through a node.

use crate::support::{TestNode, guests, oracle};

#[tokio::test(flavor = "multi_thread")]
async fn each_languages_guest_answers_through_a_node() {
    let mut setup = TestNode::setup(&[]);
    for name in ["pyfib", "jsstats", "cfib"] {
        setup = setup.file(
            &format!("{name}.wasm"),
            std::fs::read(guests::lang(name)).unwrap(),
        );
    }
    // A 12-18 MB component takes seconds to compile: keep what was
    // compiled between runs of the suite.
    let cache = guests::repo().join("guests/target/test-cache");
    let node = setup
        .config(move |config| config.cache_dir = Some(cache))
        .start()
        .await;
    assert_eq!(node.modules().len(), 3, "{:?}", node.modules());

    // Python: the RabbitMQ tutorial's fib.
    for n in [0u32, 1, 2, 20] {
        let reply = node.call("pyfib", n.to_string()).await;
        assert_eq!(
            reply.error,
            None,
            "pyfib({n}): {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.body, oracle::fib_decimal(n).as_bytes(), "pyfib({n})");
    }
    let refused = node.call("pyfib", "twenty").await;
    assert_eq!(refused.error.as_deref(), Some("bad_request"));
    assert!(
        String::from_utf8_lossy(&refused.body).contains("expected n as decimal text"),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );

    // JavaScript: JSON in, JSON out, every byte of it.
    let summary = node.call("jsstats", "[1, 2, 3.5]").await;
    assert_eq!(
        summary.error,
        None,
        "{}",
        String::from_utf8_lossy(&summary.body)
    );
    assert_eq!(
        String::from_utf8_lossy(&summary.body),
        r#"{"count":3,"sum":6.5,"mean":2.1666666666666665,"min":1,"max":3.5}"#
    );
    let refused = node.call("jsstats", "[1, \"two\"]").await;
    assert_eq!(refused.error.as_deref(), Some("bad_request"));
    assert_eq!(
        String::from_utf8_lossy(&refused.body),
        "jsstats: expected a non-empty JSON array of numbers"
    );

    // C: a plain WASI program.
    for n in [0u32, 30, 93] {
        let reply = node.call("cfib", n.to_string()).await;
        assert_eq!(reply.body, oracle::fib_decimal(n).as_bytes(), "cfib({n})");
    }
    let refused = node.call("cfib", "94").await;
    assert_eq!(refused.error.as_deref(), Some("guest_error"));
    assert!(
        String::from_utf8_lossy(&refused.body)
            .ends_with("expected n from 0 to 93 as decimal text, got \"94\""),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_module_calls_the_fleet() {
    let cache = guests::repo().join("guests/target/test-cache");
    let mut node = TestNode::setup(&["fib"])
        .file(
            "pysumfib.wasm",
            std::fs::read(guests::lang("pysumfib")).unwrap(),
        )
        .manifest("pysumfib", "calls = [\"fib\"]\n")
        .config(move |config| config.cache_dir = Some(cache))
        .start()
        .await;
    let reply = node.call("pysumfib", "1..30").await;
    assert_eq!(
        (reply.error.as_deref(), String::from_utf8_lossy(&reply.body)),
        (None, "2178308".into())
    );
    let refused = node.call("pysumfib", "3..1").await;
    assert_eq!(refused.error.as_deref(), Some("bad_request"));
    node.stop().await.unwrap();
}
