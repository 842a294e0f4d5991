//! `--log-format json`: every line a node logs is a JSON object, and every
//! line about a request carries the request's module, correlation id,
//! version and trace id.

use std::time::Duration;

use serde_json::Value;

use crate::cli::{run, text, wasmrpc};
use crate::support::node::Cleanup;
use crate::support::process::{NodeProcess, Spawn};
use crate::support::unique;

/// The next `count` lines the node logs with message `served`, parsed;
/// every line read on the way must be JSON too.
async fn served(node: NodeProcess, count: usize) -> (NodeProcess, Vec<Value>) {
    tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        while found.len() < count {
            let line = node
                .log
                .recv_timeout(Duration::from_secs(30))
                .expect("the node logged no more served requests");
            let json: Value = serde_json::from_str(&line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            if json["message"] == "served" {
                found.push(json);
            }
        }
        (node, found)
    })
    .await
    .unwrap()
}

fn is_hex(value: &Value, digits: usize) -> bool {
    value
        .as_str()
        .is_some_and(|text| text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_carry_the_request_fields() {
    let exchange = unique("json");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let node = Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_LOG_FORMAT", "json")
        .start()
        .await;
    let ready: Value = serde_json::from_str(&node.ready).expect("the ready line is JSON");
    assert_eq!(ready["level"], "INFO");
    assert!(ready["timestamp"].is_string());
    assert_eq!(ready["message"], "node ready");

    // A call that continues a trace of the caller's.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let call = run(wasmrpc(
        &exchange,
        &["call", "fib", "10", "--traceparent", parent],
    ))
    .await;
    assert_eq!(text(&call.stdout), "55\n", "{}", text(&call.stderr));
    let (node, lines) = served(node, 1).await;
    let span = &lines[0]["span"];
    assert_eq!(span["name"], "request");
    assert_eq!(span["module"], "fib");
    assert!(
        !span["correlation_id"].as_str().unwrap().is_empty(),
        "{span}"
    );
    assert!(is_hex(&span["version"], 16), "{span}");
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(is_hex(&span["span_id"], 16), "{span}");

    // `call` and `bench` start a trace of their own for every call.
    let call = run(wasmrpc(&exchange, &["call", "fib", "11"])).await;
    assert_eq!(call.status.code(), Some(0), "{}", text(&call.stderr));
    let bench = run(wasmrpc(
        &exchange,
        &["bench", "fib", "12", "--requests", "3"],
    ))
    .await;
    assert_eq!(bench.status.code(), Some(0), "{}", text(&bench.stderr));
    let (_node, lines) = served(node, 4).await;
    let mut traces = std::collections::HashSet::new();
    for line in &lines {
        let trace = &line["span"]["trace_id"];
        assert!(is_hex(trace, 32), "{line}");
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        traces.insert(trace.as_str().unwrap().to_owned());
    }
    assert_eq!(traces.len(), 4, "a trace per call: {lines:?}");
}

/// Each field of the JSON lines has one type: numbers are numbers, in the
/// lines about loading modules as in those about requests.
#[tokio::test(flavor = "multi_thread")]
async fn json_fields_have_one_type_each() {
    let exchange = unique("json-types");
    let _cleanup = Cleanup::new(&exchange, &["fib"]);
    let node = Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_LOG_FORMAT", "json")
        .launch()
        .await;
    let (node, mut lines) = tokio::task::spawn_blocking(move || {
        let lines = node.lines_until("node ready", 1);
        (node, lines)
    })
    .await
    .unwrap();
    let call = run(wasmrpc(&exchange, &["call", "fib", "x"])).await;
    assert_eq!(call.status.code(), Some(1), "{}", text(&call.stderr));
    lines.extend(
        tokio::task::spawn_blocking(move || node.lines_until("\"failed\"", 1))
            .await
            .unwrap(),
    );
    let mut seen = 0;
    for line in &lines {
        let json: Value = serde_json::from_str(line).unwrap();
        for field in ["elapsed_ms", "modules"] {
            if let Some(value) = json.get(field) {
                assert!(value.is_number(), "{field} is not a number: {line}");
                seen += 1;
            }
        }
    }
    // The load of fib, the directory's, the node ready, the failed call.
    assert!(seen >= 4, "{lines:#?}");
    // A failure names its request itself: the request's span is at debug,
    // and a node logging at info has none.
    let failed: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(failed["message"], "failed", "{failed}");
    assert_eq!(failed["module"], "fib", "{failed}");
    assert!(is_hex(&failed["version"], 16), "{failed}");
    assert!(
        !failed["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{failed}"
    );
}

/// A module's calls to other modules continue its trace: the lines of the
/// parent and of the child it called carry the caller's trace id.
#[tokio::test(flavor = "multi_thread")]
async fn a_parent_and_the_child_it_calls_log_one_trace_id() {
    let exchange = unique("json-calls");
    let _cleanup = Cleanup::new(&exchange, &["a", "panic"]);
    let relay = std::fs::read(crate::support::guests::wasm("relay")).unwrap();
    let node = Spawn::new(&exchange, &["panic"])
        .binary("a.wasm", relay)
        .file("a.toml", "calls = [\"panic\"]\n")
        .env("WASMRPC_LOG_FORMAT", "json")
        .start()
        .await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let call = run(wasmrpc(
        &exchange,
        &["call", "a", "panic;x", "--traceparent", parent],
    ))
    .await;
    assert_eq!(call.status.code(), Some(1), "{}", text(&call.stderr));
    let lines = tokio::task::spawn_blocking(move || node.lines_until("\"failed\"", 2))
        .await
        .unwrap();
    let failed: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|json| json["message"] == "failed")
        .collect();
    let modules: Vec<&str> = failed
        .iter()
        .map(|json| json["module"].as_str().unwrap())
        .collect();
    assert_eq!(
        modules,
        ["panic", "a"],
        "the child fails first: {failed:#?}"
    );
    for json in &failed {
        assert_eq!(
            json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{json}"
        );
    }
}
