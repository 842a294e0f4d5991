//! The HTTP endpoint cannot be held open: idle and half-sent connections
//! are closed, and however many there are, the health check gets in.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::TestNode;
use crate::support::http::get;

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
