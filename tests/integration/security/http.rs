//! The HTTP endpoint cannot be held open: idle and half-sent connections
//! are closed, and however many there are, the health check gets in.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::http::get;
use crate::support::process::Spawn;
use crate::support::{TestNode, unique};

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_connections_are_closed_and_health_answers_meanwhile() {
    let node = TestNode::setup(&["fib"]).with_http().start().await;
    let addr = node.http.unwrap();
    let started = Instant::now();
    let mut held = Vec::new();
    for n in 0..220 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if n % 11 == 0 {
            // Half a request: headers that never end.
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    // Every one of them is still open on this side, and the node answers.
    for _ in 0..5 {
        let asked = Instant::now();
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }
    let (status, _) = get(addr, "/readyz").await;
    assert_eq!(status, 200);

    // The node closes each: at once past its cap, or when its headers are
    // overdue (10 s). Whatever it sent before closing is read and dropped.
    let closed: Vec<_> = held
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer))
                        .await
                    {
                        Ok(Ok(0) | Err(_)) => return true,
                        Ok(Ok(_)) => continue,
                        Err(_) => return false,
                    }
                }
            })
        })
        .collect();
    let mut open = 0;
    for connection in closed {
        open += usize::from(!connection.await.unwrap());
    }
    let elapsed = started.elapsed();
    println!("220 held connections all closed by the node within {elapsed:?}");
    assert_eq!(open, 0, "connections the node kept open");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
}

/// Opens `count` connections to `addr` and sends nothing on them.
async fn hold(addr: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn held_connections_leave_a_node_the_files_it_needs() {
    // 128 open files at most, as on a small box: 300 held connections took
    // every descriptor the node had, and deploys and replies failed.
    let exchange = unique("files");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let node = Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_HTTP", &addr.to_string())
        .open_files_limit(128)
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib"]);
    let held = hold(addr, 300).await;
    let (status, _) = get(addr, "/readyz").await;
    assert_eq!(status, 200);
    let client = TestNode::client_for(&exchange).await;
    for n in 0..20 {
        let reply = client
            .call("fib", b"30", Duration::from_secs(10))
            .await
            .unwrap_or_else(|error| panic!("call {n} with 300 connections held: {error}"));
        assert_eq!(reply.body, b"832040");
    }
    drop(held);
    let log = node.unread_log().join("\n");
    assert!(!log.contains("Too many open files"), "{log}");
}
