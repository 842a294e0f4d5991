//! What a node is doing and has done: requests running now (watchable, so
//! tests can await a change instead of polling) and calls answered per
//! module, for the fleet view; module files the loader refused.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;

use crate::names::ModuleName;

#[derive(Debug)]
pub struct Stats {
    started: Instant,
    running: watch::Sender<usize>,
    /// Calls answered, all modules together.
    answered: watch::Sender<u64>,
    /// Module files the loader refused.
    refused: watch::Sender<u64>,
    calls: Mutex<BTreeMap<ModuleName, Calls>>,
}

/// Calls a module answered on this node since it started, whatever version
/// was serving. A call counts once the broker has confirmed its reply, so a
/// request whose session was lost before it was answered counts only when
/// it is answered again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// Every call that reached the module and was answered.
    pub answered: u64,
    /// Of those, the ones answered with an error.
    pub failed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            running: watch::Sender::new(0),
            answered: watch::Sender::new(0),
            refused: watch::Sender::new(0),
            calls: Mutex::default(),
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

    pub(crate) fn record(&self, module: &ModuleName, failed: bool) {
        {
            let mut calls = self.calls.lock().expect("stats lock");
            let calls = calls.entry(module.clone()).or_default();
            calls.answered += 1;
            calls.failed += u64::from(failed);
        }
        self.answered.send_modify(|answered| *answered += 1);
    }

    /// The number of calls answered, all modules together, kept up to date.
    pub fn answered(&self) -> watch::Receiver<u64> {
        self.answered.subscribe()
    }

    /// Counts module files the loader refused: a new module that failed to
    /// load, or a new version refused while the last good one serves on.
    pub(crate) fn refused_load(&self) {
        self.refused.send_modify(|refused| *refused += 1);
    }

    /// The number of module files refused, kept up to date.
    pub fn refused(&self) -> watch::Receiver<u64> {
        self.refused.subscribe()
    }

    pub fn calls(&self, module: &ModuleName) -> Calls {
        self.calls
            .lock()
            .expect("stats lock")
            .get(module)
            .copied()
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// One running request; see [`Stats::run`].
pub(crate) struct Running<'a>(&'a Stats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.send_modify(|running| *running -= 1);
    }
}
