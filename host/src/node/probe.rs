//! What a node tells the outside about itself, for `/metrics` and `/readyz`:
//! the metrics exposition and whether it is ready, with the reason when it
//! is not. A `Probe` stays valid while and after the node serves.

use std::sync::Arc;

use super::shared::{Shared, State};
use crate::metrics::Readings;

/// A view of a running node; clone-cheap.
#[derive(Clone)]
pub struct Probe {
    pub(super) shared: Arc<Shared>,
    pub(super) state: tokio::sync::watch::Receiver<State>,
}

impl Probe {
    /// Ready means requests published now reach this node: it has a session
    /// on a broker and is subscribed to every module it loaded. Otherwise,
    /// why not, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        match &*self.state.borrow() {
            State::Connecting => Err(
                match &*self.shared.shown.broker_error.lock().expect("probe lock") {
                    Some(error) => format!("not connected to the broker: {error}"),
                    None => "connecting to the broker".to_owned(),
                },
            ),
            State::Stopping => Err("draining: the node is shutting down".to_owned()),
            State::Serving { .. } => {
                let subscribed = self.shared.shown.subscribed.lock().expect("probe lock");
                let missing: Vec<String> = self
                    .shared
                    .modules
                    .registry
                    .names()
                    .into_iter()
                    .filter(|name| !subscribed.contains(name))
                    .map(|name| name.to_string())
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "not subscribed to module(s) {}",
                        missing.join(", ")
                    ))
                }
            }
        }
    }

    /// The metrics, in the OpenMetrics text format.
    pub fn metrics(&self) -> String {
        self.shared.shown.metrics.encode()
    }
}

/// What the metrics' gauges read at a scrape.
pub(super) fn readings(shared: &Shared, state: &tokio::sync::watch::Receiver<State>) -> Readings {
    Readings {
        running: *shared.shown.stats.running().borrow(),
        slots_free: shared.requests.admission.slots_free(),
        modules: shared
            .modules
            .registry
            .all()
            .iter()
            .map(|module| (module.name.to_string(), module.version.clone()))
            .collect(),
        connected: matches!(*state.borrow(), State::Serving { .. }),
    }
}
