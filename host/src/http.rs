//! The node's HTTP endpoint (`serve --http ADDR`), for orchestrators and
//! Prometheus: `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (requests published now reach this node; 503 with a one-line reason
//! otherwise). It reads the node through a [`Probe`] and changes nothing.
//!
//! Whoever can reach the port can open connections, so none may hold one:
//! a connection must send a request's headers within [`HEADER_TIMEOUT`] of
//! opening or of its last answer (idle or half-sent, it is closed then), no
//! connection lives longer than [`LIFETIME`], and at most
//! [`MAX_CONNECTIONS`] are open (fewer under a low open-file limit, so that
//! the broker connections, deploys and the cache always have descriptors
//! left): one more makes the oldest close, so that a flood of idle
//! connections cannot keep out the health check.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics;
use crate::node::Probe;

/// How long a connection may take to send a request's headers, counted from
/// when it opened or was last answered.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a connection stays open, however busy: then it is closed
/// once its request in flight is answered (a client reconnects).
pub const LIFETIME: Duration = Duration::from_secs(20);

/// How long a connection closing at [`LIFETIME`] may take to finish its
/// request in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The most connections open at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;

/// [`MAX_CONNECTIONS`], or a quarter of the process's open-file limit if
/// that is less (at least 4).
fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let quarter = usize::try_from(limit.rlim_cur / 4).unwrap_or(usize::MAX);
    if known {
        MAX_CONNECTIONS.min(quarter).max(4)
    } else {
        MAX_CONNECTIONS
    }
}

/// After a failed accept (out of file descriptors, say), wait this long
/// before the next, rather than spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Listens on `addr`; fails if it cannot (in use, not ours).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr} for HTTP"))
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    probe: Probe,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(probe);
    let cap = connection_cap();
    // A permit per connection, given back when its socket is closed: never
    // more sockets open than the cap, and the one just accepted.
    let permits = Arc::new(Semaphore::new(cap));
    let open = Arc::new(Open::default());
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!("failed to accept an HTTP connection: {error}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // Full: the oldest goes, and this one waits until its socket
            // is closed.
            Err(_) => {
                open.close_oldest();
                tokio::select! {
                    () = &mut shutdown => break,
                    permit = permits.clone().acquire_owned() => {
                        permit.expect("the semaphore is never closed")
                    }
                }
            }
        };
        let (id, closed) = open.add(&stop);
        let service = TowerToHyperService::new(app.clone());
        let open = open.clone();
        tasks.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = closed.cancelled() => {}
                () = tokio::time::sleep(LIFETIME) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                }
            }
            open.remove(id);
            drop(permit);
        });
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The connections open, oldest first, each with what closes it.
#[derive(Default)]
struct Open {
    connections: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

impl Open {
    /// Counts a new connection in. Returns its id and what closes it.
    fn add(&self, stop: &CancellationToken) -> (u64, CancellationToken) {
        let mut guard = self.connections.lock().expect("connections lock");
        let (next, open) = &mut *guard;
        *next += 1;
        let closed = stop.child_token();
        open.insert(*next, closed.clone());
        (*next, closed)
    }

    /// Closes the connection open longest.
    fn close_oldest(&self) {
        let oldest = self
            .connections
            .lock()
            .expect("connections lock")
            .1
            .pop_first();
        if let Some((_, closed)) = oldest {
            closed.cancel();
        }
    }

    fn remove(&self, id: u64) {
        self.connections
            .lock()
            .expect("connections lock")
            .1
            .remove(&id);
    }
}

async fn metrics(State(probe): State<Probe>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        probe.metrics(),
    )
}

async fn readyz(State(probe): State<Probe>) -> (StatusCode, String) {
    match probe.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", reason.replace('\n', " ")),
        ),
    }
}
