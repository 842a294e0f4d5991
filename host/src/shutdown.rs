//! The process's stop signal: the first SIGINT or SIGTERM asks for a warm
//! shutdown, a second one ends the process at once.

use std::process;

use tokio::signal::unix::{SignalKind, signal};

/// Exit status when a second signal cuts a warm shutdown short.
const FORCED_EXIT: i32 = 130;

/// Completes on the first SIGINT or SIGTERM. From then on, another one exits
/// the process immediately: the broker returns whatever was unacked to the
/// queues, so nothing is lost, only recomputed.
pub async fn signal_received() {
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!("cannot listen for stop signals, stop this node with SIGKILL: {error}");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(
        "{name} received: finishing the requests in flight (send another signal to stop now)"
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::warn!("second stop signal: exiting without finishing the requests in flight");
        process::exit(FORCED_EXIT);
    });
}
