//! What a node makes of its modules directory: it serves what it can and
//! skips, with a log line, what it cannot, without refusing to start; a call
//! of a module it could not load is told why.

use wasmrpc::names::ModuleName;

use crate::support::TestNode;
use crate::support::guests;
use crate::support::raw::{RawClient, body, error_header};

fn component(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_that_cannot_be_served_are_skipped_and_the_rest_served() {
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let node = TestNode::setup(&["fib"])
        .file("text.wasm", "not wasm at all")
        .file("empty.wasm", "")
        .file("core.wasm", component("(module (func (export \"call\")))"))
        .file("nothing.wasm", component("(component)"))
        .file(
            "wrongtype.wasm",
            component(
                r#"(component
                    (core module $m (func (export "f")))
                    (core instance $i (instantiate $m))
                    (func (export "call") (canon lift (core func $i "f"))))"#,
            ),
        )
        .file(
            "imports.wasm",
            component(r#"(component (import "acme:secrets/vault" (instance)))"#),
        )
        .file("Bad.Name.wasm", fib.clone())
        .file("badmanifest.wasm", fib.clone())
        .file("badmanifest.toml", "[limits]\nmemroy = \"1MiB\"\n")
        .file("notes.txt", "not a module")
        .start()
        .await;
    let expected: Vec<ModuleName> = vec!["fib".parse().unwrap()];
    assert_eq!(node.modules(), expected);

    let mut client = RawClient::connect().await;
    let reply = client.call(node.exchange(), "fib", b"12").await;
    assert_eq!(body(&reply), "144");
    for (module, why) in [
        ("text", "not a wasm binary"),
        ("empty", "not a wasm binary"),
        ("core", "not a WASI preview 1 program"),
        ("nothing", "exports neither"),
        (
            "wrongtype",
            "does not implement the wasmrpc:compute/module world",
        ),
        ("imports", "exports neither"),
        ("badmanifest", "invalid manifest"),
    ] {
        let reply = client.call(node.exchange(), module, b"1").await;
        let message = body(&reply);
        assert_eq!(
            error_header(&reply).as_deref(),
            Some("load_failed"),
            "{module}: {message}"
        );
        assert!(
            message.starts_with(&format!("module {module:?} could not be loaded: "))
                && message.contains(why),
            "{module}: {message}"
        );
    }
    // A name no file has is not found; one no module may have is refused.
    let reply = client.call(node.exchange(), "nosuch", b"1").await;
    assert_eq!(error_header(&reply).as_deref(), Some("not_found"));
    let reply = client.call(node.exchange(), "Bad.Name", b"1").await;
    assert_eq!(error_header(&reply).as_deref(), Some("bad_request"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_no_module_to_serve_still_answers_not_found() {
    let node = TestNode::setup(&[])
        .file("text.wasm", "not wasm")
        .start()
        .await;
    assert!(node.modules().is_empty());
    let mut client = RawClient::connect().await;
    let reply = client.call(node.exchange(), "fib", b"1").await;
    assert_eq!(error_header(&reply).as_deref(), Some("not_found"));
    let reply = client.call(node.exchange(), "text", b"1").await;
    assert_eq!(error_header(&reply).as_deref(), Some("load_failed"));
}
