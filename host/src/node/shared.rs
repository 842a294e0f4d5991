//! What the parts of a node share, each part saying what it is: who the
//! node is, what its requests use, its modules, and what it shows outside;
//! and where it stands with its broker.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::deploys::Deploys;
use crate::metrics::Metrics;
use crate::names::ModuleName;
use crate::registry::{Loader, Registry};
use crate::request::Requests;
use crate::stats::Stats;
use crate::wire::Topology;

/// Where a node stands with its broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for a broker to answer: at start, or after losing one.
    Connecting,
    /// Subscribed to every module it serves, through session `session` (the
    /// first is 1) on `broker`.
    Serving { broker: String, session: u64 },
    /// Shutting down: it takes no new requests.
    Stopping,
}

/// What every session of a node shares, in parts that say what they are;
/// each task gets the parts it uses.
pub(crate) struct Shared {
    /// Who the node is, and what it was configured to run with.
    pub identity: Identity,
    /// What every request uses, made once.
    pub requests: Arc<Requests>,
    /// The modules: served, being loaded or failed, and deployed.
    pub modules: Modules,
    /// What the node shows outside (fleet answers, `/metrics`, `/readyz`).
    pub shown: Shown,
}

/// Who a node is, and what it was configured to run with.
pub(crate) struct Identity {
    pub id: String,
    pub host: String,
    pub concurrency: u32,
    /// Requests in progress at once, at most.
    pub instances: u32,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub topology: Topology,
}

/// A node's modules.
pub(crate) struct Modules {
    pub registry: Arc<Registry>,
    /// What is being loaded, and what failed to.
    pub loader: Arc<Loader>,
    /// How it takes deploys, if it does.
    pub deploys: Option<Arc<Deploys>>,
}

/// What a node shows outside: what it did (stats, metrics, which the
/// requests count into) and where it stands with the broker.
pub(crate) struct Shown {
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// The modules the current session is subscribed to; empty without one.
    pub subscribed: Mutex<BTreeSet<ModuleName>>,
    /// Why the node has no session, while it has none.
    pub broker_error: Mutex<Option<String>>,
}
