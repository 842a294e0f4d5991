//! The process's stop signals: the first SIGINT or SIGTERM asks for a warm
//! shutdown, a second one ends the drain. Both are futures the caller
//! selects on (`cli/serve.rs` returns an exit status for the second): this
//! file never ends the process itself.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Stop signals received so far, counted from 0.
#[derive(Clone)]
pub struct Signals(watch::Receiver<u32>);

impl Signals {
    /// Starts counting SIGINT and SIGTERM. A node that cannot listen for
    /// them says so and can be stopped only with SIGKILL.
    pub fn listen() -> Signals {
        let (count, counted) = watch::channel(0);
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::spawn(async move {
                    loop {
                        let name = tokio::select! {
                            _ = interrupt.recv() => "SIGINT",
                            _ = terminate.recv() => "SIGTERM",
                        };
                        count.send_modify(|count| *count += 1);
                        match *count.borrow() {
                            1 => tracing::info!(
                                "{name} received: finishing the requests in flight (send another signal to stop now)"
                            ),
                            _ => tracing::warn!(
                                "second stop signal: exiting without finishing the requests in flight"
                            ),
                        }
                    }
                });
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(
                    "cannot listen for stop signals, stop this node with SIGKILL: {error}"
                );
                // The sender lives on, so the count stays 0 and nothing ends.
                std::mem::forget(count);
            }
        }
        Signals(counted)
    }

    /// Completes once the first stop signal has come: a warm shutdown.
    pub async fn first(self) {
        self.nth(1).await;
    }

    /// Completes once a second one has: the drain is cut short. The broker
    /// returns whatever was unacked to the queues, so nothing is lost, only
    /// recomputed.
    pub async fn second(self) {
        self.nth(2).await;
    }

    async fn nth(mut self, n: u32) {
        if self.0.wait_for(|count| *count >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
