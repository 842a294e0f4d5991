//! The calls a module makes to other modules (`wasmrpc:compute/fleet`),
//! carried over the broker: each one a request like any caller's, served by
//! whichever node serves its module (this one included), on a connection of
//! the node's own for them (not the consuming one, as with replies).
//!
//! A child call carries what is left of its parent's deadline, a child span
//! of the parent's trace, and its depth in the chain of calls: past
//! `max_depth` it is not made (`too_deep`), so a module that calls itself
//! ends. When the parent's deadline passes, its pending calls fail with
//! `timeout` and their replies, if they come, are dropped.
//!
//! No deadlock: a parent waiting for its children computes nothing (its
//! guest is suspended in a host call and holds no permit to run wasm), and
//! on its first call it gives its place among the node's requests back and
//! takes one among the *waiting parents* instead, a separate bound by count
//! and by memory. So children are admitted even when every request place
//! is held by a parent that waits. When the waiting parents are at their
//! bound, or the node has as many children in flight as it may, a call
//! fails at once (`busy`) rather than wait for a place that a waiting
//! parent may never give back.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::amqp::Brokers;
use crate::client::{CallOptions, Client, ClientError};
use crate::metrics::Metrics;
use crate::names::ModuleName;
use crate::runtime::{Fleet, FleetError, Outcome, fleet_kind as kind};
use crate::trace::TraceParent;
use crate::wire::ErrorKind;

/// The bounds on calls between modules, per node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildLimits {
    /// The deepest a chain of calls may go (an outside caller's request is
    /// at depth 0; the calls it makes at 1).
    pub max_depth: u32,
    /// The most calls one `call-all` may make.
    pub max_calls: usize,
    /// The most child calls in flight from this node at once.
    pub max_in_flight: usize,
    /// The most requests that may wait for their calls at once.
    pub max_waiting: usize,
    /// The most memory those waiting requests may hold, in bytes.
    pub waiting_memory: u64,
}

impl ChildLimits {
    /// Waiting parents per guest that computes, by default.
    pub const WAITING_PER_RUNNING: usize = 16;

    /// The defaults for a node whose `concurrency` guests compute at once.
    pub const fn for_concurrency(concurrency: u32) -> ChildLimits {
        let running = if concurrency == 0 { 1 } else { concurrency };
        ChildLimits {
            max_depth: 4,
            max_calls: 64,
            max_in_flight: 1024,
            max_waiting: Self::WAITING_PER_RUNNING * running as usize,
            waiting_memory: 2 << 30,
        }
    }

    /// The depth of a call made at `depth` to `module`, or `too_deep`.
    pub fn depth_of_call(&self, depth: u32, module: &str) -> Result<u32, FleetError> {
        let depth = depth.saturating_add(1);
        if depth > self.max_depth {
            return Err(FleetError::new(
                kind::TOO_DEEP,
                format!(
                    "a call to {module:?} would be {depth} deep, past the limit of {}",
                    self.max_depth
                ),
            ));
        }
        Ok(depth)
    }
}

/// The node's side of every child call: the connection and the bounds.
pub(crate) struct Children {
    brokers: Brokers,
    exchange: String,
    connection_name: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    limits: ChildLimits,
    in_flight: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
    /// In KiB, so that a semaphore can count it.
    waiting_memory: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Children {
    pub(crate) fn new(
        brokers: Brokers,
        exchange: String,
        connection_name: String,
        limits: ChildLimits,
        metrics: Arc<Metrics>,
    ) -> Children {
        let kib = usize::try_from(limits.waiting_memory >> 10).unwrap_or(usize::MAX);
        Children {
            brokers,
            exchange,
            connection_name,
            client: tokio::sync::Mutex::default(),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            waiting: Arc::new(Semaphore::new(limits.max_waiting)),
            waiting_memory: Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS))),
            limits,
            metrics,
        }
    }

    /// The connection child calls go out on, opened on the first call and
    /// again after it is lost.
    async fn client(&self) -> Result<Arc<Client>, FleetError> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|open| !open.is_closed()) {
            return Ok(open.clone());
        }
        let opened = Client::connect_as(&self.brokers, &self.exchange, &self.connection_name)
            .await
            .map_err(|error| {
                FleetError::new(
                    kind::UNAVAILABLE,
                    format!("cannot reach the broker: {error:#}"),
                )
            })?;
        let opened = Arc::new(opened);
        *client = Some(opened.clone());
        Ok(opened)
    }

    /// Closes the connection, for shutdown.
    pub(crate) async fn close(&self) {
        self.client.lock().await.take();
    }
}

/// Where a parent stands among the node's requests: admitted like any
/// request (`A` is its place there), or moved to the waiting parents on its
/// first call.
pub(crate) enum Place<A> {
    /// Held, to be given back when it moves.
    Admitted(#[allow(dead_code)] A),
    Waiting {
        _count: OwnedSemaphorePermit,
        _memory: OwnedSemaphorePermit,
    },
}

/// One request's calls to other modules.
pub(crate) struct ChildCalls<A> {
    pub children: Arc<Children>,
    /// The calling module, for the metrics.
    pub module: ModuleName,
    /// When the parent must answer: its caller's deadline or its own time
    /// limit, whichever comes first.
    pub deadline: Instant,
    /// The parent's span, of which each call is a child.
    pub trace: Option<TraceParent>,
    /// The parent's depth in the chain of calls.
    pub depth: u32,
    pub place: Mutex<Place<A>>,
}

impl<A> ChildCalls<A> {
    /// Moves the parent to the waiting parents, if it is not there yet.
    fn wait_as_parent(&self, memory: u64) -> Result<(), FleetError> {
        let mut place = self.place.lock().expect("place lock");
        if !matches!(*place, Place::Admitted(_)) {
            return Ok(());
        }
        let busy = |what: &str| {
            FleetError::new(
                kind::BUSY,
                format!("the node holds as many waiting callers as it may ({what})"),
            )
        };
        let count = self
            .children
            .waiting
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(&format!("{} requests", self.children.limits.max_waiting)))?;
        let kib = u32::try_from(memory.div_ceil(1 << 10)).unwrap_or(u32::MAX);
        let memory = self
            .children
            .waiting_memory
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| busy("their memory"))?;
        *place = Place::Waiting {
            _count: count,
            _memory: memory,
        };
        Ok(())
    }

    async fn call_one(&self, client: &Client, module: String, input: Vec<u8>) -> Outcome {
        let depth = self.children.limits.depth_of_call(self.depth, &module)?;
        let Ok(_in_flight) = self.children.in_flight.clone().try_acquire_owned() else {
            return Err(FleetError::new(
                kind::BUSY,
                format!(
                    "the node has as many calls in flight as it may ({})",
                    self.children.limits.max_in_flight
                ),
            ));
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(FleetError::new(
                kind::TIMEOUT,
                "the caller's deadline has passed",
            ));
        }
        let options = CallOptions {
            traceparent: self.trace.as_ref().map(TraceParent::child),
            depth,
        };
        match client.call_with(&module, &input, left, &options).await {
            Ok(reply) => match reply.error {
                None => Ok(reply.body),
                Some(error) => Err(FleetError {
                    kind: error,
                    message: String::from_utf8_lossy(&reply.body).into_owned(),
                }),
            },
            Err(ClientError::Timeout(_)) => Err(FleetError::new(
                kind::TIMEOUT,
                format!("{module} did not answer before the caller's deadline"),
            )),
            Err(error) => Err(FleetError::new(kind::UNAVAILABLE, error.to_string())),
        }
    }

    /// Counts an outcome, with a bounded label.
    fn count(&self, outcome: Result<(), &FleetError>) {
        let label = match outcome {
            Ok(()) => "ok",
            Err(error) => ErrorKind::parse(&error.kind)
                .map(ErrorKind::as_str)
                .or_else(|| kind::ALL.into_iter().find(|known| *known == error.kind))
                .unwrap_or("other"),
        };
        self.children.metrics.child_call(&self.module, label);
    }
}

impl<A: Send> Fleet for ChildCalls<A> {
    fn max_calls(&self) -> usize {
        self.children.limits.max_calls
    }

    fn call_all(
        &self,
        calls: Vec<(String, Vec<u8>)>,
        memory: u64,
    ) -> Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + '_>> {
        Box::pin(async move {
            let count = calls.len();
            let outcomes = match self.wait_as_parent(memory) {
                Err(busy) => vec![Err(busy); count],
                Ok(()) => match self.children.client().await {
                    Err(unavailable) => vec![Err(unavailable); count],
                    Ok(client) => {
                        join_all(
                            calls
                                .into_iter()
                                .map(|(module, input)| self.call_one(&client, module, input)),
                        )
                        .await
                    }
                },
            };
            for outcome in &outcomes {
                self.count(outcome.as_ref().map(|_| ()));
                if let Err(error) = outcome {
                    tracing::debug!(kind = %error.kind, "a call to another module failed: {}", error.message);
                }
            }
            outcomes
        })
    }

    fn refused(&self, error: &FleetError) {
        self.count(Err(error));
    }
}
