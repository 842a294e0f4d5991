//! Plain WASI programs as modules: a WASI 0.2 command and a preview 1 core
//! module (what C with wasi-libc, Zig or TinyGo emit). The request body is
//! stdin, stdout is the reply, exit status 0 is success, anything else a
//! `guest_error` with the end of stderr; every limit applies.

use crate::support::{TestNode, guests};

/// A node serving `upcase` as a WASI 0.2 command and `upcase1` as the same
/// program built for preview 1, with a manifest of tight limits for each.
async fn node() -> TestNode {
    let limits = "[limits]\ntime = \"300ms\"\nmemory = \"16MiB\"\nreply = \"64KiB\"\n";
    TestNode::setup(&["upcase"])
        .file(
            "upcase1.wasm",
            std::fs::read(guests::preview1("upcase")).unwrap(),
        )
        .manifest("upcase", limits)
        .manifest("upcase1", limits)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_the_request_and_stdout_the_reply() {
    let node = node().await;
    for module in ["upcase", "upcase1"] {
        let reply = node.call(module, "hello, wasi").await;
        assert_eq!(
            reply.error,
            None,
            "{module}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.body, b"HELLO, WASI", "{module}");
        assert!(reply.version.is_some(), "{module}");
        // An empty body is an empty stdin.
        assert_eq!(node.call(module, "").await.body, b"", "{module}");
        // No arguments, no environment, no files.
        let probe = node.call(module, "probe").await;
        assert_eq!(
            String::from_utf8_lossy(&probe.body),
            "args=0 env=0 root=refused",
            "{module}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_exit_is_a_guest_error_with_the_end_of_stderr() {
    let node = node().await;
    for module in ["upcase", "upcase1"] {
        let reply = node
            .call(module, "exit 3 the input was not to my taste")
            .await;
        assert_eq!(reply.error.as_deref(), Some("guest_error"), "{module}");
        let message = String::from_utf8_lossy(&reply.body);
        assert!(
            message.starts_with(&format!("{module}: exited with status "))
                && message.ends_with("the input was not to my taste"),
            "{module}: {message}"
        );
        // Exit status 0 is success, whatever the program said on stderr.
        let quiet = node.call(module, "exit 0 all is well").await;
        assert_eq!(quiet.error, None, "{module}");
        assert_eq!(quiet.body, b"", "{module}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_limit_applies_to_programs() {
    let node = node().await;
    for module in ["upcase", "upcase1"] {
        let spin = node.call(module, "spin").await;
        assert_eq!(spin.error.as_deref(), Some("timeout"), "{module}");
        let alloc = node.call(module, "alloc 64").await;
        assert_eq!(alloc.error.as_deref(), Some("memory"), "{module}");
        let big = node.call(module, "big 100000").await;
        assert_eq!(big.error.as_deref(), Some("too_large"), "{module}");
        assert!(
            String::from_utf8_lossy(&big.body).contains("reply of 100000 bytes"),
            "{module}: {}",
            String::from_utf8_lossy(&big.body)
        );
        // Just under the limits is fine.
        let fits = node.call(module, "big 65536").await;
        assert_eq!(fits.body.len(), 65536, "{module}");
        assert_eq!(node.call(module, "alloc 4").await.error, None, "{module}");
        let too_big_input = vec![b'a'; (1 << 20) + 1];
        let refused = node.call(module, &too_big_input).await;
        assert_eq!(refused.error.as_deref(), Some("too_large"), "{module}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_view_shows_each_modules_kind() {
    let node = TestNode::setup(&["fib", "upcase"])
        .file(
            "upcase1.wasm",
            std::fs::read(guests::preview1("upcase")).unwrap(),
        )
        .start()
        .await;
    let nodes = node
        .client()
        .await
        .fleet(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    let [status] = nodes.as_slice() else {
        panic!("one node should answer: {nodes:?}");
    };
    let kinds: Vec<(&str, &str)> = status
        .modules
        .iter()
        .map(|module| (module.name.as_str(), module.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fib", "component"),
            ("upcase", "wasi-command"),
            ("upcase1", "wasi-preview1")
        ]
    );
}
