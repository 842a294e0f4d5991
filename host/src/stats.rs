//! What a node is doing: how many requests are running wasm right now.
//! Watchable, so that whoever needs to know (tests, and soon the fleet view)
//! can await a change instead of polling.

use tokio::sync::watch;

#[derive(Debug)]
pub struct Stats {
    running: watch::Sender<usize>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            running: watch::Sender::new(0),
        }
    }
}

impl Stats {
    /// Counts a request as running until the returned guard is dropped.
    pub(crate) fn run(&self) -> Running<'_> {
        self.running.send_modify(|running| *running += 1);
        Running(self)
    }

    /// The number of requests running wasm, kept up to date.
    pub fn running(&self) -> watch::Receiver<usize> {
        self.running.subscribe()
    }
}

/// One running request; see [`Stats::run`].
pub(crate) struct Running<'a>(&'a Stats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.send_modify(|running| *running -= 1);
    }
}
