//! The HTTP endpoint an operator's tools read: `/metrics` counts what the
//! node did, `/readyz` says whether requests reach it, and `wasmrpc health`
//! turns that into an exit status.

use std::time::Duration;

use wasmrpc::amqp::Brokers;

use crate::cli::{run, text, wasmrpc};
use crate::support::http::{self, metrics_until, readyz_until};
use crate::support::proxy::Proxy;
use crate::support::{TestNode, amqp_url};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_the_node_did() {
    let node = TestNode::setup(&["fib", "spin"])
        .manifest("spin", "[limits]\ntime = \"100ms\"\n")
        .with_http()
        .start()
        .await;
    let addr = node.http.unwrap();
    let client = node.client().await;
    // 10 calls to fib, of which 3 are refused; one spin over its time limit;
    // one call to a module nobody serves.
    for input in ["1", "2", "abc", "3", "4", "-5", "5", "6", "x", "7"] {
        client
            .call("fib", input.as_bytes(), Duration::from_secs(10))
            .await
            .unwrap();
    }
    let spun = client
        .call("spin", b"5000", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(spun.error.as_deref(), Some("timeout"));
    let missing = client
        .call("nosuch", b"", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(missing.error.as_deref(), Some("not_found"));

    let requests = |m: &http::Exposition, module, outcome| {
        m.get(
            "wasmrpc_requests_total",
            &[("module", module), ("outcome", outcome)],
        )
    };
    let metrics = metrics_until(addr, |m| {
        requests(m, "fib", "ok") == Some(7.0)
            && requests(m, "fib", "bad_request") == Some(3.0)
            && requests(m, "spin", "timeout") == Some(1.0)
            && m.get(
                "wasmrpc_unrouted_requests_total",
                &[("outcome", "not_found")],
            ) == Some(1.0)
    })
    .await;
    let fib = [("module", "fib")];
    assert_eq!(metrics.get("wasmrpc_run_seconds_count", &fib), Some(10.0));
    let run_time = metrics.get("wasmrpc_run_seconds_sum", &fib).unwrap();
    assert!(run_time > 0.0 && run_time < 10.0, "{run_time}");
    // Our client stamps every request, so each one's wait was measured.
    assert_eq!(
        metrics.get("wasmrpc_queue_wait_seconds_count", &fib),
        Some(10.0)
    );
    assert_eq!(
        metrics.get(
            "wasmrpc_limits_tripped_total",
            &[("module", "spin"), ("limit", "time")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.get(
            "wasmrpc_limits_tripped_total",
            &[("module", "fib"), ("limit", "time")]
        ),
        None
    );
    // One line per module loaded, with the version its replies carry.
    let versions = metrics.all("wasmrpc_module");
    assert_eq!(versions.len(), 2, "{}", metrics.text);
    let fib_version = node.call("fib", "1").await.version.unwrap();
    assert_eq!(
        metrics.get(
            "wasmrpc_module",
            &[("module", "fib"), ("version", &fib_version)]
        ),
        Some(1.0)
    );
    assert_eq!(metrics.get("wasmrpc_requests_running", &[]), Some(0.0));
    // Idle, every instance is free: the node says how many it has.
    let fleet = client.fleet(Duration::from_secs(2)).await.unwrap();
    assert_eq!(fleet.len(), 1, "{fleet:?}");
    let slots = metrics.get("wasmrpc_slots_free", &[]).unwrap();
    assert_eq!(
        slots,
        f64::from(fleet[0].instances),
        "slots free on an idle node"
    );
    assert_eq!(metrics.get("wasmrpc_broker_connected", &[]), Some(1.0));
    assert_eq!(
        metrics.get("wasmrpc_broker_reconnects_total", &[]),
        Some(0.0)
    );
    // Nothing a caller chose became a label.
    assert!(!metrics.text.contains("nosuch"), "{}", metrics.text);

    let (status, body) = http::get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_broker_and_health_says_so() {
    let proxy = Proxy::start(&amqp_url()).await;
    let brokers: Brokers = proxy.url().parse().unwrap();
    let mut node = TestNode::setup(&["fib"])
        .config(move |config| config.brokers = brokers)
        .with_http()
        .start()
        .await;
    let addr = node.http.unwrap();
    let health = |addr: String| {
        let mut command = wasmrpc("unused", &["health", "--http", &addr]);
        command.env_remove("WASMRPC_HTTP");
        run(command)
    };

    assert_eq!(readyz_until(addr, 200, Duration::ZERO).await, "ready\n");
    let ready = health(addr.to_string()).await;
    assert_eq!(ready.status.code(), Some(0), "{}", text(&ready.stderr));
    // A node listening on every interface is asked on loopback.
    let any = health(format!("0.0.0.0:{}", addr.port())).await;
    assert_eq!(any.status.code(), Some(0), "{}", text(&any.stderr));

    proxy.cut();
    let reason = readyz_until(addr, 503, Duration::from_secs(15)).await;
    assert!(
        reason.starts_with("not connected to the broker") && reason.lines().count() == 1,
        "{reason:?}"
    );
    let down = health(addr.to_string()).await;
    assert_eq!(down.status.code(), Some(1));
    assert!(
        text(&down.stderr).contains("not connected to the broker"),
        "{}",
        text(&down.stderr)
    );

    proxy.restore();
    readyz_until(addr, 200, Duration::from_secs(15)).await;
    let metrics = metrics_until(addr, |m| {
        m.get("wasmrpc_broker_connected", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(
        metrics.get("wasmrpc_broker_reconnects_total", &[]),
        Some(1.0)
    );
    assert_eq!(node.call("fib", "10").await.body, b"55");

    // Draining is not ready either; the endpoint answers until the end.
    node.stop().await.unwrap();
    let draining = readyz_until(addr, 503, Duration::ZERO).await;
    assert!(draining.starts_with("draining"), "{draining:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_fails_without_a_node_and_asks_where_scripts_run_serves() {
    // A port nothing listens on: bound, then let go.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let mut command = wasmrpc("unused", &["health", "--http", &addr, "--timeout", "2s"]);
    command.env_remove("WASMRPC_HTTP");
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("no answer from"),
        "{}",
        text(&output.stderr)
    );

    // Without an address, where `scripts/run` serves (a node may be there).
    let mut command = wasmrpc("unused", &["health", "--timeout", "2s"]);
    command.env_remove("WASMRPC_HTTP");
    let output = run(command).await;
    assert!(
        output.status.success() || text(&output.stderr).contains("http://127.0.0.1:9090/readyz"),
        "{}",
        text(&output.stderr)
    );
    let output = run(wasmrpc("unused", &["health", "--http", "nowhere"])).await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));

    // The address may come from the environment, as in the container image.
    let mut command = wasmrpc("unused", &["health"]);
    command.env("WASMRPC_HTTP", &addr);
    assert_eq!(run(command).await.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_process_serves_http_when_asked() {
    let exchange = crate::support::unique("http");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let node = crate::support::process::Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_HTTP", &addr.to_string())
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib"]);
    readyz_until(addr, 200, Duration::from_secs(5)).await;
    let mut command = wasmrpc(&exchange, &["health"]);
    command.env("WASMRPC_HTTP", addr.to_string());
    let health = run(command).await;
    assert_eq!(health.status.code(), Some(0), "{}", text(&health.stderr));
    drop(node);
}
