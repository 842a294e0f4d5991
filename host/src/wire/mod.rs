//! The wire contract: what a request and a reply look like on the broker, and
//! where they go. README.md documents the same contract for other languages;
//! keep the two in step.
//!
//! - Requests are published to the durable direct exchange [`Topology::exchange`]
//!   with the module name as routing key, the argument as body, and `reply_to`
//!   plus `correlation_id` set.
//! - Each module has a durable queue bound to that exchange by its name; every
//!   node that serves the module consumes it.
//! - The exchange's alternate exchange catches requests no queue is bound for;
//!   every node consumes the queue behind it and answers `not_found`.
//! - Replies go through the default exchange to `reply_to`, with the request's
//!   `correlation_id`, `app_id` [`APP_ID`] and a `timestamp`; a failed
//!   request's reply carries [`ERROR_HEADER`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::names::ModuleName;
use crate::runtime::CallError;

pub mod reply;
pub mod request;

/// The exchange name used when none is configured.
pub const DEFAULT_EXCHANGE: &str = "wasmrpc";

/// The header that marks a reply as an error and names its kind.
pub const ERROR_HEADER: &str = "x-error";

/// The header of every reply a module produced: the version (content hash)
/// of the module that did.
pub const VERSION_HEADER: &str = "x-module-version";

/// A request header: the most milliseconds the caller will wait, counted
/// from when a node takes the request. Can only shorten the module's limit.
pub const TIMEOUT_HEADER: &str = "x-timeout-ms";

/// A request header: the Unix time, in milliseconds, by which the caller
/// needs the reply. Counts time spent queued; needs synchronized clocks.
pub const DEADLINE_HEADER: &str = "x-deadline";

/// A request header: the caller's W3C trace context. A valid one is
/// recorded in the node's log of the request and answered with a
/// `traceparent` of the same trace, whose parent is the node's span; an
/// invalid one is ignored.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Vendor trace data that travels with [`TRACEPARENT_HEADER`]; a node passes
/// it back unchanged.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Set by a node on a request it forwards to its module's queue (one that
/// came before the queue was bound): how many times it was.
pub const FORWARDS_HEADER: &str = "x-wasmrpc-forwards";

/// Set by a node on a request for a module it knows nothing of, which it
/// publishes once more after a moment (a node may have just found the
/// module's file): how many times it was. A request that comes back with it
/// is answered `not_found`.
pub const UNROUTED_HEADER: &str = "x-wasmrpc-unrouted";

/// Set on a call a module makes to another module: how deep in a chain of
/// such calls it is (1 for a call made by a module an outside caller
/// called). A node refuses to make calls past its `--max-call-depth`.
pub const DEPTH_HEADER: &str = "x-wasmrpc-depth";

/// Set on a call a module makes to another module: how many calls the
/// called request may still cause in all, its own and those of the calls
/// it makes, down the whole tree (a node starts an outside caller's request
/// at its `--max-calls-per-request`, and never believes a header above it).
/// A call past it fails `too_many`.
pub const BUDGET_HEADER: &str = "x-wasmrpc-budget";

/// Set on a call a module makes to another module: the largest reply body,
/// in bytes, its caller can take. The called node answers a larger output
/// `too_large` instead of sending it.
pub const REPLY_LIMIT_HEADER: &str = "x-wasmrpc-reply-limit";

/// Set on the reply to a call that carried [`BUDGET_HEADER`]: how many
/// calls the request caused in all, so that its caller gets back the part
/// of the budget it did not use.
pub const CALLS_HEADER: &str = "x-wasmrpc-calls";

/// The `app_id` of every reply.
pub const APP_ID: &str = "wasmrpc";

/// The `content_type` of a module's successful replies unless its manifest
/// names another.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The `content_type` of error replies: their body is a message for humans.
pub const ERROR_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Set by quorum queues on a redelivery: how many times the request was
/// returned to its queue (RabbitMQ 3.x: any return; from 4.3: a failure a
/// consumer reported with `basic.reject`, not a consumer that died).
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Set by quorum queues from RabbitMQ 4.0 on a redelivery: how many times
/// the request was handed to a consumer before, whatever became of it.
pub const ACQUIRED_COUNT_HEADER: &str = "x-acquired-count";

/// How long an unroutable request waits for a node to say `not_found`. Past
/// that its caller has long given up.
pub const UNROUTED_TTL_MS: u32 = 60_000;

/// The wall clock as the wire counts it (AMQP timestamps, `x-deadline`,
/// signed deploys): time since the Unix epoch; zero if the clock is before it.
pub fn unix_time() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The names of everything one wasmrpc deployment declares on the broker,
/// all derived from its exchange name so deployments (and tests) can share a
/// broker without meeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    exchange: String,
}

impl Topology {
    pub fn new(exchange: impl Into<String>) -> Self {
        Topology {
            exchange: exchange.into(),
        }
    }

    /// The direct exchange callers publish requests to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The fanout exchange that receives what the main exchange cannot route.
    pub fn unrouted_exchange(&self) -> String {
        format!("{}.unrouted", self.exchange)
    }

    /// The queue every node consumes to answer requests for unknown modules.
    pub fn unrouted_queue(&self) -> String {
        format!("{}.unrouted", self.exchange)
    }

    /// The fanout exchange that module queues dead-letter poison requests to.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.exchange)
    }

    /// Where poison requests end up, for an operator to inspect.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.exchange)
    }

    /// The fanout exchange every node listens on for fleet questions
    /// (`wasmrpc ping`, `wasmrpc modules`); each node binds a queue of its own.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.exchange)
    }

    /// The queue that holds requests for one module. Module names contain no
    /// dot, so these never collide with the names above.
    pub fn module_queue(&self, module: &ModuleName) -> String {
        format!("{}.module.{module}", self.exchange)
    }
}

/// What a node answers on the control exchange, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id, random at each start.
    pub node: String,
    pub host: String,
    /// The wasmrpc version the node runs.
    pub version: String,
    pub uptime_ms: u64,
    /// Guests that compute at once: its `serve --concurrency`.
    pub concurrency: u32,
    /// Requests it has in progress at once, at most (some may be waiting
    /// in a host call or for their turn to compute): 4 × `concurrency`.
    #[serde(default)]
    pub instances: u32,
    /// Requests in progress now.
    pub running: usize,
    /// Whether it takes deploy orders (`serve --accept-deploys`); see
    /// [`NodeStatus::accepts`].
    #[serde(default)]
    pub accepts_deploys: bool,
    /// `accepts_deploys` under its old name: written for readers of
    /// `--json` made against it, read from nodes before this release; it
    /// goes in the next release.
    #[serde(default)]
    pub takes_deploys: bool,
    /// The largest module it takes in a deploy (`--deploy-limit`), if it
    /// takes deploys; its control queue holds orders up to twice that and
    /// 1 MiB, and the broker keeps larger ones from it.
    #[serde(default)]
    pub deploy_limit: Option<u64>,
    pub modules: Vec<ModuleStatus>,
}

impl NodeStatus {
    /// Whether the node takes deploy orders, under either name.
    pub fn accepts(&self) -> bool {
        self.accepts_deploys || self.takes_deploys
    }
}

/// One module a node serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    /// The version replies carry in [`VERSION_HEADER`].
    pub version: String,
    /// What it is: `component` (the wasmrpc world), `wasi-command` (a WASI
    /// 0.2 program) or `wasi-preview1` (a WASI preview 1 program).
    #[serde(default = "component")]
    pub kind: String,
    /// Calls it answered on this node since the node started.
    pub calls: u64,
    /// Of those, the ones answered with an error.
    pub failed: u64,
    /// The modules it may call (its manifest's `calls`): names, or `*`.
    #[serde(default)]
    pub may_call: Vec<String>,
}

/// What nodes from before kinds were reported serve.
fn component() -> String {
    "component".to_owned()
}

/// The kinds of failure a reply can report, as named by [`ERROR_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed, or the module refused its input.
    BadRequest,
    /// No node serves the module named by the routing key.
    NotFound,
    /// The module accepted the input but reported that it could not compute a result.
    GuestError,
    /// The module crashed (a panic, an `unreachable`, a bad memory access...).
    Trap,
    /// The module ran longer than its time limit.
    Timeout,
    /// The module needed more memory than its limit.
    Memory,
    /// The module recursed deeper than its stack limit.
    StackOverflow,
    /// The request body or the module's output exceeded its size limit.
    TooLarge,
    /// The node could not run the request (it never reached the module).
    Internal,
    /// Nodes took the request several times and stopped before replying
    /// each time; it was set aside in the dead-letter queue instead of run again.
    Poison,
    /// The module's file is there, but it could not be loaded (it is not a
    /// module, does not compile, has a bad manifest), and no node serves it.
    LoadFailed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::BadRequest,
        ErrorKind::NotFound,
        ErrorKind::GuestError,
        ErrorKind::Trap,
        ErrorKind::Timeout,
        ErrorKind::Memory,
        ErrorKind::StackOverflow,
        ErrorKind::TooLarge,
        ErrorKind::Internal,
        ErrorKind::Poison,
        ErrorKind::LoadFailed,
    ];

    /// The value of [`ERROR_HEADER`] for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::GuestError => "guest_error",
            ErrorKind::Trap => "trap",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Memory => "memory",
            ErrorKind::StackOverflow => "stack_overflow",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Internal => "internal",
            ErrorKind::Poison => "poison",
            ErrorKind::LoadFailed => "load_failed",
        }
    }

    pub fn parse(value: &str) -> Option<ErrorKind> {
        ErrorKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == value)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&CallError> for ErrorKind {
    fn from(error: &CallError) -> Self {
        match error {
            CallError::InvalidInput(_) => ErrorKind::BadRequest,
            CallError::Failed(_) => ErrorKind::GuestError,
            CallError::InputTooLarge { .. } | CallError::OutputTooLarge { .. } => {
                ErrorKind::TooLarge
            }
            CallError::Timeout { .. }
            | CallError::Deadline { .. }
            | CallError::DeadlinePassed { .. } => ErrorKind::Timeout,
            CallError::Memory { .. } => ErrorKind::Memory,
            CallError::StackOverflow { .. } => ErrorKind::StackOverflow,
            CallError::Trap(_) => ErrorKind::Trap,
            CallError::Instantiate(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_says_accepts_deploys_as_the_flag_does_and_reads_the_old_name() {
        let old = r#"{"node":"n","host":"h","version":"0.1.0","uptime_ms":1,
            "concurrency":2,"running":0,"takes_deploys":true,"modules":[]}"#;
        let status: NodeStatus = serde_json::from_str(old).unwrap();
        assert!(status.accepts());
        let new = NodeStatus {
            accepts_deploys: true,
            takes_deploys: true,
            ..status
        };
        let shown = serde_json::to_string(&new).unwrap();
        assert!(shown.contains(r#""accepts_deploys":true"#), "{shown}");
        assert!(shown.contains(r#""takes_deploys":true"#), "{shown}");
        let read: NodeStatus = serde_json::from_str(&shown).unwrap();
        assert_eq!(read, new);
    }

    #[test]
    fn error_kinds_round_trip_through_their_header_value() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("nonsense"), None);
    }

    #[test]
    fn topology_names_derive_from_the_exchange() {
        let topology = Topology::new("rpc");
        let fib: ModuleName = "fib".parse().unwrap();
        assert_eq!(topology.module_queue(&fib), "rpc.module.fib");
        assert_eq!(topology.unrouted_queue(), "rpc.unrouted");
        assert_ne!(
            topology.module_queue(&"unrouted".parse().unwrap()),
            topology.unrouted_queue()
        );
    }
}
