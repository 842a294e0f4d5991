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
//! What one request causes is bounded as a whole, not only per call: it
//! starts with a budget of calls (`max_tree_calls`, or what its caller's
//! budget header left it, whichever is less), each call it makes spends one,
//! and each child is given an equal share of what is left for its own calls
//! and theirs, and gives back what its reply says it did not use. Each child
//! is also told the largest reply its parent can take (an equal share of the
//! room left in the parent's memory), and its node answers a larger output
//! `too_large` rather than send it. Replies count against the waiting
//! parents' memory as they arrive, and a parent's own memory is counted
//! again at each of its calls.
//!
//! No deadlock: a parent waiting for its children computes nothing (its
//! guest is suspended in a host call and holds no permit to run wasm), and
//! on its first call it gives its place among the node's requests back and
//! takes one among the *waiting parents* instead, a separate bound by count
//! and by memory, of which no module holds more than half. So children are
//! admitted even when every request place is held by a parent that waits.
//! When the waiting parents are at their bound, or the node has as many
//! children in flight as it may, a call fails at once (`busy`) rather than
//! wait for a place that a waiting parent may never give back.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::wire::request::Chain;

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
    /// The most calls one outside caller's request may cause in all, down
    /// its whole tree of calls.
    pub max_tree_calls: u64,
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
            max_tree_calls: 256,
        }
    }

    /// The budget of calls of a request whose caller gave it `given`
    /// (`None`: an outside caller, who gets the node's whole budget, and
    /// never more).
    pub fn budget(&self, given: Option<u64>) -> u64 {
        given.map_or(self.max_tree_calls, |given| given.min(self.max_tree_calls))
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
    /// How many of the waiting parents each module has: at most half.
    waiting_by_module: Mutex<HashMap<ModuleName, usize>>,
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
            waiting_by_module: Mutex::default(),
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

    /// The bounds it keeps.
    pub(crate) fn limits(&self) -> &ChildLimits {
        &self.limits
    }

    /// Closes the connection, for shutdown.
    pub(crate) async fn close(&self) {
        self.client.lock().await.take();
    }

    /// A place among the waiting parents for one more of `module`'s, if the
    /// module holds less than half of them (one, on a node with one or two).
    fn module_share(self: &Arc<Self>, module: &ModuleName) -> Option<ModuleShare> {
        let share = (self.limits.max_waiting / 2).max(1);
        let mut counts = self.waiting_by_module.lock().expect("share lock");
        let count = counts.entry(module.clone()).or_default();
        if *count >= share {
            return None;
        }
        *count += 1;
        Some(ModuleShare {
            children: self.clone(),
            module: module.clone(),
        })
    }
}

/// One waiting parent's place in its module's share; given back when dropped.
pub(crate) struct ModuleShare {
    children: Arc<Children>,
    module: ModuleName,
}

impl Drop for ModuleShare {
    fn drop(&mut self) {
        let mut counts = self.children.waiting_by_module.lock().expect("share lock");
        if let Some(count) = counts.get_mut(&self.module) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.module);
            }
        }
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
        _share: ModuleShare,
        /// In KiB: what the parent held at its largest call so far.
        memory: OwnedSemaphorePermit,
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
    /// How many calls the parent may still cause (its budget less what its
    /// calls took or hold).
    pub budget: Mutex<u64>,
    /// How many calls the parent caused so far: its own, and what its
    /// children said theirs caused.
    pub caused: AtomicU64,
    pub place: Mutex<Place<A>>,
}

impl<A> ChildCalls<A> {
    /// Makes a parent for a budget of `budget` calls, at `depth`.
    pub(crate) fn new(
        children: Arc<Children>,
        module: ModuleName,
        (deadline, trace): (Instant, Option<TraceParent>),
        (depth, budget): (u32, u64),
        place: A,
    ) -> ChildCalls<A> {
        ChildCalls {
            children,
            module,
            deadline,
            trace,
            depth,
            budget: Mutex::new(budget),
            caused: AtomicU64::new(0),
            place: Mutex::new(Place::Admitted(place)),
        }
    }

    /// How many calls the parent caused in all so far.
    pub(crate) fn caused(&self) -> u64 {
        self.caused.load(Ordering::Relaxed)
    }

    /// Moves the parent to the waiting parents, if it is not there yet, and
    /// counts `memory` (what it holds now) against theirs.
    fn wait_as_parent(&self, memory: u64) -> Result<(), FleetError> {
        let mut place = self.place.lock().expect("place lock");
        let busy = |what: &str| {
            FleetError::new(
                kind::BUSY,
                format!("the node holds as many waiting callers as it may ({what})"),
            )
        };
        let kib = u32::try_from(memory.div_ceil(1 << 10)).unwrap_or(u32::MAX);
        if let Place::Waiting { memory: held, .. } = &mut *place {
            // Its memory may have grown since its last call.
            let more = (kib as usize).saturating_sub(held.num_permits());
            if more > 0 {
                let grown = self
                    .children
                    .waiting_memory
                    .clone()
                    .try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
                    .map_err(|_| busy("their memory"))?;
                held.merge(grown);
            }
            return Ok(());
        }
        let share = self.children.module_share(&self.module).ok_or_else(|| {
            busy(&format!(
                "half of them are {}'s, as many as one module may hold",
                self.module
            ))
        })?;
        let count = self
            .children
            .waiting
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(&format!("{} requests", self.children.limits.max_waiting)))?;
        let memory = self
            .children
            .waiting_memory
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| busy("their memory"))?;
        *place = Place::Waiting {
            _count: count,
            _share: share,
            memory,
        };
        Ok(())
    }

    /// Takes `calls` calls from the budget, and an equal share of what is
    /// left for each: `Some(share)`, or `None` if the budget cannot pay for
    /// the calls themselves.
    fn spend(&self, calls: u64) -> Option<u64> {
        let mut left = self.budget.lock().expect("budget lock");
        if calls == 0 || calls > *left {
            return None;
        }
        *left -= calls;
        let share = *left / calls;
        *left -= share * calls;
        self.caused.fetch_add(calls, Ordering::Relaxed);
        Some(share)
    }

    /// A child given `share` says its request caused `used` calls (`None`:
    /// it did not say, and spent it all): the rest comes back.
    fn settle(&self, share: u64, used: Option<u64>) {
        let used = used.unwrap_or(share).min(share);
        self.caused.fetch_add(used, Ordering::Relaxed);
        *self.budget.lock().expect("budget lock") += share - used;
    }

    async fn call_one(
        &self,
        client: &Client,
        (module, input): (String, Vec<u8>),
        (budget, reply_limit): (u64, u64),
    ) -> Result<(Vec<u8>, OwnedSemaphorePermit), FleetError> {
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
            chain: Chain {
                depth,
                budget: Some(budget),
                reply_limit: Some(reply_limit),
            },
        };
        let called = client.call_with(&module, &input, left, &options).await;
        self.settle(budget, called.as_ref().ok().and_then(|reply| reply.calls));
        match called {
            Ok(reply) => match reply.error {
                None => self.hold(reply.body),
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

    /// A reply as it arrives, counted against the waiting parents' memory
    /// (the permit) until the parent has it.
    fn hold(&self, body: Vec<u8>) -> Result<(Vec<u8>, OwnedSemaphorePermit), FleetError> {
        let kib = u32::try_from((body.len() as u64).div_ceil(1 << 10)).unwrap_or(u32::MAX);
        match self
            .children
            .waiting_memory
            .clone()
            .try_acquire_many_owned(kib)
        {
            Ok(held) => Ok((body, held)),
            Err(_) => Err(FleetError::new(
                kind::BUSY,
                format!(
                    "the node holds as much memory for waiting callers as it may; \
                     a reply of {} bytes does not fit",
                    body.len()
                ),
            )),
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

impl<A: Send> ChildCalls<A> {
    /// What `count` calls need before they are made: the parent among the
    /// waiting parents, the calls paid from its budget (the share of each
    /// child returned), and the connection.
    async fn start_calls(
        &self,
        count: usize,
        memory: u64,
    ) -> Result<(Arc<Client>, u64), FleetError> {
        self.wait_as_parent(memory)?;
        let budget = self.spend(count as u64).ok_or_else(|| {
            FleetError::new(
                kind::TOO_MANY,
                format!(
                    "{count} more calls would take this request past the calls it may cause in all \
                     ({} a request, --max-calls-per-request; {} left)",
                    self.children.limits.max_tree_calls,
                    self.budget.lock().expect("budget lock")
                ),
            )
        })?;
        match self.children.client().await {
            Ok(client) => Ok((client, budget)),
            Err(unavailable) => {
                // Not made: the calls and their shares come back.
                let mut left = self.budget.lock().expect("budget lock");
                *left += count as u64 * (budget + 1);
                self.caused.fetch_sub(count as u64, Ordering::Relaxed);
                Err(unavailable)
            }
        }
    }
}

impl<A: Send> Fleet for ChildCalls<A> {
    fn max_calls(&self) -> usize {
        self.children.limits.max_calls
    }

    fn call_all(
        &self,
        calls: Vec<(String, Vec<u8>)>,
        (memory, room): (u64, u64),
    ) -> Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + '_>> {
        Box::pin(async move {
            let count = calls.len();
            let outcomes = match self.start_calls(count, memory).await {
                Err(error) => vec![Err(error); count],
                Ok((client, budget)) => {
                    // Each child may answer an equal share of the room the
                    // parent's memory has left for the replies.
                    let reply_limit = room / count as u64;
                    let made = join_all(
                        calls
                            .into_iter()
                            .map(|call| self.call_one(&client, call, (budget, reply_limit))),
                    )
                    .await;
                    // The replies' memory is counted until they are the
                    // guest's: until this returns.
                    let (outcomes, held): (Vec<Outcome>, Vec<_>) = made
                        .into_iter()
                        .map(|made| match made {
                            Ok((reply, held)) => (Ok(reply), Some(held)),
                            Err(error) => (Err(error), None),
                        })
                        .unzip();
                    drop(held);
                    outcomes
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's children with `limits`; no connection is opened.
    fn children(limits: ChildLimits) -> Arc<Children> {
        Arc::new(Children::new(
            Brokers::parse(&["amqp://127.0.0.1:5672"]).unwrap(),
            "wasmrpc".into(),
            "test".into(),
            limits,
            Arc::default(),
        ))
    }

    fn parent(children: &Arc<Children>, module: &str, budget: u64) -> ChildCalls<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        ChildCalls::new(
            children.clone(),
            module.parse().unwrap(),
            (deadline, None),
            (0, budget),
            (),
        )
    }

    #[test]
    fn a_budget_pays_for_the_calls_and_shares_the_rest() {
        let children = children(ChildLimits::for_concurrency(1));
        let calls = parent(&children, "relay", 256);
        // 64 calls: 192 left, 3 for each child.
        assert_eq!(calls.spend(64), Some(3));
        assert_eq!(*calls.budget.lock().unwrap(), 0);
        // Children that made no calls give their shares back.
        for _ in 0..64 {
            calls.settle(3, Some(0));
        }
        assert_eq!(*calls.budget.lock().unwrap(), 192);
        assert_eq!(calls.caused(), 64);
        // One that says nothing spent its whole share; none gives back more.
        assert_eq!(calls.spend(1), Some(191));
        calls.settle(191, None);
        assert_eq!(*calls.budget.lock().unwrap(), 0);
        assert_eq!(calls.spend(1), None);
        assert_eq!(calls.caused(), 64 + 1 + 191);
        let lying = parent(&children, "relay", 10);
        assert_eq!(lying.spend(1), Some(9));
        lying.settle(9, Some(u64::MAX));
        assert_eq!(*lying.budget.lock().unwrap(), 0);
    }

    #[test]
    fn a_caller_never_raises_a_budget() {
        let limits = ChildLimits::for_concurrency(1);
        assert_eq!(limits.budget(None), 256);
        assert_eq!(limits.budget(Some(10)), 10);
        assert_eq!(limits.budget(Some(1 << 40)), 256);
    }

    #[test]
    fn no_module_holds_more_than_half_the_waiting_parents() {
        let limits = ChildLimits {
            max_waiting: 4,
            ..ChildLimits::for_concurrency(1)
        };
        let children = children(limits);
        let parents: Vec<_> = (0..3).map(|_| parent(&children, "relay", 8)).collect();
        assert!(parents[0].wait_as_parent(1024).is_ok());
        assert!(parents[1].wait_as_parent(1024).is_ok());
        let third = parents[2].wait_as_parent(1024).unwrap_err();
        assert_eq!(third.kind, kind::BUSY);
        // Another module still has its half.
        let other = parent(&children, "sumfib", 8);
        assert!(other.wait_as_parent(1024).is_ok());
        // A place given back is the module's again.
        drop(parents);
        assert!(parent(&children, "relay", 8).wait_as_parent(1024).is_ok());
    }

    #[test]
    fn a_parents_memory_is_counted_again_at_each_call() {
        let limits = ChildLimits {
            waiting_memory: 4 << 20,
            ..ChildLimits::for_concurrency(1)
        };
        let children = children(limits);
        let grows = parent(&children, "relay", 8);
        assert!(grows.wait_as_parent(1 << 20).is_ok());
        assert!(grows.wait_as_parent(3 << 20).is_ok());
        // 5 MiB at its third call: past the 4 MiB all waiting parents may hold.
        assert_eq!(grows.wait_as_parent(5 << 20).unwrap_err().kind, kind::BUSY);
        assert_eq!(children.waiting_memory.available_permits(), 1 << 10);
        // Replies count too, as they arrive.
        assert!(grows.hold(vec![0; 1 << 19]).is_ok());
        assert_eq!(grows.hold(vec![0; 2 << 20]).unwrap_err().kind, kind::BUSY);
    }
}
