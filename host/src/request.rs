//! One delivery, from arrival to settlement: run it (or decide it cannot
//! run), reply to its caller, then settle it with the broker.
//!
//! Every delivery that names a caller gets exactly one reply, success or
//! error, and only then is settled: if the node dies before the broker has
//! confirmed the reply, the request goes back to its queue. A delivery
//! without `reply_to` has nobody to answer; it is logged and acked.
//!
//! [`settle`] is the only place in the node that acks, requeues or rejects.
//! A request task sees the node only through its [`Context`]: the reply
//! path, the slots, the stats and the two signals that end its interest
//! (the node stopping, its session lost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::amqp::header_u64;
use crate::logging::Escaped;
use crate::metrics::{Limit, Metrics};
use crate::names::ModuleName;
use crate::registry::LoadedModule;
use crate::replies::{Replies, ReplyError};
use crate::runtime::CallError;
use crate::stats::Stats;
use crate::trace::TraceParent;
use crate::wire::{
    ACQUIRED_COUNT_HEADER, APP_ID, DEADLINE_HEADER, DEFAULT_CONTENT_TYPE, DELIVERY_COUNT_HEADER,
    ERROR_CONTENT_TYPE, ERROR_HEADER, ErrorKind, FORWARDS_HEADER, TIMEOUT_HEADER,
    TRACEPARENT_HEADER, TRACESTATE_HEADER, VERSION_HEADER, unix_time,
};

/// What a request task may use of the node.
pub(crate) struct Context {
    pub replies: Arc<Replies>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// Requests in progress at once (the runtime's instances).
    pub slots: Arc<Semaphore>,
    /// Each module's share of them.
    pub shares: Arc<Shares>,
    /// Deliveries after which a request is poison.
    pub delivery_limit: u32,
    /// Where poison requests go, for the message that says so.
    pub dead_queue: String,
    /// Where requests are published, for one forwarded to its module.
    pub requests_exchange: String,
    /// Cancelled when the node begins to shut down.
    pub stopping: CancellationToken,
    /// Cancelled when the broker session the deliveries came on is lost:
    /// they can no longer be settled, and the broker hands them out again.
    pub lost: CancellationToken,
}

/// How many of a node's instances each module may hold at once, so that a
/// module whose requests sleep or loop cannot keep the others from running.
/// By name: the versions of a module share its share.
pub(crate) struct Shares {
    per_module: usize,
    modules: Mutex<HashMap<ModuleName, Arc<Semaphore>>>,
}

impl Shares {
    pub(crate) fn new(per_module: usize) -> Shares {
        Shares {
            per_module,
            modules: Mutex::default(),
        }
    }

    fn of(&self, module: &ModuleName) -> Arc<Semaphore> {
        let mut modules = self.modules.lock().expect("shares lock");
        modules
            .entry(module.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_module)))
            .clone()
    }
}

/// What goes back to the caller.
pub(crate) struct Reply {
    body: Vec<u8>,
    error: Option<ErrorKind>,
    /// The version of the module that produced it, if one did.
    version: Option<String>,
    content_type: Option<String>,
    /// The trace context to answer with: the node's span of the caller's
    /// trace, and the caller's `tracestate`.
    trace: Option<(TraceParent, Option<LongString>)>,
}

impl Reply {
    fn ok(body: Vec<u8>) -> Self {
        Reply {
            body,
            error: None,
            version: None,
            content_type: None,
            trace: None,
        }
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply {
            body: message.into().into_bytes(),
            error: Some(kind),
            version: None,
            content_type: Some(ERROR_CONTENT_TYPE.to_owned()),
            trace: None,
        }
    }

    pub(crate) fn json(body: Vec<u8>) -> Self {
        Reply {
            content_type: Some("application/json".to_owned()),
            ..Reply::ok(body)
        }
    }

    fn properties(&self, correlation_id: Option<&ShortString>) -> BasicProperties {
        let mut properties = BasicProperties::default()
            .with_app_id(APP_ID.into())
            .with_timestamp(unix_time().as_secs())
            .with_content_type(
                self.content_type
                    .as_deref()
                    .unwrap_or(DEFAULT_CONTENT_TYPE)
                    .into(),
            );
        if let Some(correlation_id) = correlation_id {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        let mut headers = FieldTable::default();
        let mut header = |name: &str, value: LongString| {
            headers.insert(name.into(), AMQPValue::LongString(value));
        };
        if let Some(kind) = self.error {
            header(ERROR_HEADER, kind.as_str().into());
        }
        if let Some(version) = &self.version {
            header(VERSION_HEADER, version.as_str().into());
        }
        if let Some((parent, state)) = &self.trace {
            header(TRACEPARENT_HEADER, parent.to_string().into());
            if let Some(state) = state {
                header(TRACESTATE_HEADER, state.clone());
            }
        }
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        properties
    }
}

/// What a delivery is for.
pub(crate) enum Target {
    /// A module, in the version served when the request arrived.
    Module(Arc<LoadedModule>),
    /// No module queue took it: it came through the alternate exchange.
    Unrouted,
    /// It came through the alternate exchange before its module's queue was
    /// bound (the module was being loaded): it goes to that queue now.
    Forward(ModuleName),
    /// It came through the alternate exchange for a module whose file this
    /// node could not load, and why.
    Failed(ModuleName, String),
}

/// What the broker is told about a delivery once its reply is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Done: the broker forgets it.
    Ack,
    /// Not done here: back to its queue, for this node or another.
    Requeue,
    /// Never to be run again: the queue dead-letters it (or drops it, if
    /// the queue has no dead-letter exchange).
    DeadLetter,
}

pub(crate) async fn handle(context: Arc<Context>, target: Target, delivery: Delivery) {
    let correlation_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map_or("", ShortString::as_str);
    // Both come from the caller: escaped, they cannot forge a log line.
    let span = tracing::info_span!(
        "request",
        module = %Escaped(delivery.routing_key.as_str()),
        correlation_id = %Escaped(correlation_id),
        version = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let trace = trace_context(&delivery, &span);
    handle_in_span(&context, target, delivery, trace)
        .instrument(span)
        .await;
}

/// The caller's trace context, if it sent a valid one, continued by a span
/// of the node's own, which the request's log span records. A malformed one
/// is the caller's business: it costs a debug line, never the request.
fn trace_context(
    delivery: &Delivery,
    span: &tracing::Span,
) -> Option<(TraceParent, Option<LongString>)> {
    let headers = delivery.properties.headers().as_ref()?;
    let value = headers.inner().get(TRACEPARENT_HEADER)?;
    let parsed = match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).parse(),
        AMQPValue::ShortString(text) => text.as_str().parse(),
        _ => {
            tracing::debug!(parent: span, "ignoring a traceparent header that is not a string");
            return None;
        }
    };
    let ours = match parsed {
        Ok(parent) => TraceParent::child(&parent),
        Err(error) => {
            tracing::debug!(parent: span, "ignoring the request's trace context: {error}");
            return None;
        }
    };
    span.record("trace_id", ours.trace_id());
    span.record("span_id", ours.span_id());
    let state = match headers.inner().get(TRACESTATE_HEADER) {
        None => None,
        Some(AMQPValue::LongString(state)) => trace_state(state.as_bytes(), span),
        Some(AMQPValue::ShortString(state)) => trace_state(state.as_str().as_bytes(), span),
        Some(_) => {
            tracing::debug!(parent: span, "ignoring a tracestate header that is not a string");
            None
        }
    };
    Some((ours, state))
}

/// The most a `tracestate` may hold to be passed on: W3C Trace Context's
/// limits (32 list members; 512 bytes, beyond which vendors may drop it).
/// The reply echoes it, so it must stay small whatever the caller sends.
pub(crate) const MAX_TRACESTATE: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The caller's `tracestate`, to echo in the reply, if it is within W3C's
/// limits and printable; otherwise dropped, with a debug line.
fn trace_state(state: &[u8], span: &tracing::Span) -> Option<LongString> {
    let why = if state.len() > MAX_TRACESTATE {
        "longer than 512 bytes"
    } else if !state.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        "not printable ASCII"
    } else if state.split(|&b| b == b',').count() > MAX_TRACESTATE_MEMBERS {
        "more than 32 members"
    } else {
        return Some(LongString::from(state.to_vec()));
    };
    tracing::debug!(parent: span, "dropping the request's tracestate: {why}");
    None
}

async fn handle_in_span(
    context: &Context,
    target: Target,
    delivery: Delivery,
    trace: Option<(TraceParent, Option<LongString>)>,
) {
    let received = Instant::now();
    let module = match &target {
        Target::Module(module) => {
            tracing::Span::current().record("version", module.version.as_str());
            if let Some(wait) = queue_wait(&delivery) {
                context.metrics.waited(&module.name, wait);
            }
            Some(module.name.clone())
        }
        Target::Unrouted | Target::Forward(_) | Target::Failed(..) => None,
    };
    if delivery.properties.reply_to().is_none() {
        tracing::warn!("dropping request without reply_to: there is nobody to answer");
        settle(context, &delivery, Settlement::Ack).await;
        count(context, module.as_ref(), Some(ErrorKind::BadRequest));
        return;
    }
    let mut outcome = match target {
        Target::Unrouted => Outcome {
            reply: unrouted(delivery.routing_key.as_str()),
            settlement: Settlement::Ack,
            ran: None,
        },
        Target::Failed(name, why) => Outcome {
            reply: load_failed(&name, &why),
            settlement: Settlement::Ack,
            ran: None,
        },
        Target::Forward(name) => {
            forward(context, &delivery, &name).await;
            return;
        }
        Target::Module(module) => match run_module(context, module, &delivery, received).await {
            Some(outcome) => outcome,
            None => return,
        },
    };
    outcome.reply.trace = trace;

    let Some(reply) = answer(context, &delivery, outcome.reply, outcome.settlement).await else {
        return;
    };
    if let Some(name) = outcome.ran {
        context.stats.record(&name, reply.error.is_some());
    }
    count(context, module.as_ref(), reply.error);
    let elapsed_ms = (received.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    match reply.error {
        // At info, a line per call would cost a busy node a third of its
        // CPU (measured: 100 µs a call against 71 µs without).
        None => tracing::debug!(elapsed_ms, "served"),
        Some(kind) => tracing::warn!(
            elapsed_ms,
            error = %kind,
            detail = %Escaped(&String::from_utf8_lossy(&reply.body)),
            "failed"
        ),
    }
}

/// Counts an answered request in the metrics.
fn count(context: &Context, module: Option<&ModuleName>, error: Option<ErrorKind>) {
    match module {
        Some(module) => context.metrics.answered(module, error),
        None => context
            .metrics
            .unrouted(error.unwrap_or(ErrorKind::NotFound)),
    }
}

/// How long the request waited since its caller stamped it (the AMQP
/// `timestamp`, in seconds; a value too large for seconds is read as
/// milliseconds, as some clients send). `None` without a stamp, or with one
/// from the future (clocks differ).
fn queue_wait(delivery: &Delivery) -> Option<Duration> {
    let stamp = (*delivery.properties.timestamp())?;
    // Seconds since 1970 stay below 10^11 until the year 5138.
    let stamp = if stamp >= 100_000_000_000 {
        Duration::from_millis(stamp)
    } else {
        Duration::from_secs(stamp)
    };
    unix_time().checked_sub(stamp)
}

/// What a request comes to before its reply goes out.
struct Outcome {
    reply: Reply,
    settlement: Settlement,
    /// The module that ran, for the stats: a call counts once answered.
    ran: Option<ModuleName>,
}

/// Runs a request for `module`, unless it is poison or its headers are
/// malformed. `None` when it was handed back instead: the node is stopping
/// (back to its queue, for another node) or the session was lost (the
/// broker has it back already).
async fn run_module(
    context: &Context,
    module: Arc<LoadedModule>,
    delivery: &Delivery,
    received: Instant,
) -> Option<Outcome> {
    if let Some(reply) = poison_check(context, &module.name, delivery) {
        return Some(Outcome {
            reply,
            settlement: Settlement::DeadLetter,
            ran: None,
        });
    }
    let deadline = match caller_deadline(delivery.properties.headers().as_ref(), received) {
        Ok(deadline) => deadline,
        Err(message) => {
            return Some(Outcome {
                reply: Reply::error(ErrorKind::BadRequest, format!("{}: {message}", module.name)),
                settlement: Settlement::Ack,
                ran: None,
            });
        }
    };
    // On arrival, not when a slot frees: a body over the limit is never
    // held while it waits.
    let limit = module.module.limits().request;
    if delivery.data.len() > limit {
        context.metrics.tripped(&module.name, Limit::Request);
        let error = CallError::InputTooLarge {
            size: delivery.data.len(),
            limit,
        };
        return Some(Outcome {
            reply: Reply {
                version: Some(module.version.clone()),
                ..Reply::error(ErrorKind::from(&error), format!("{}: {error}", module.name))
            },
            settlement: Settlement::Ack,
            ran: Some(module.name.clone()),
        });
    }
    // The module's share first, so that a module at its share holds no
    // instance another module could use.
    let share = context.shares.of(&module.name);
    let admitted = async {
        let share = share.acquire().await;
        let slot = context.slots.acquire().await;
        (share, slot)
    };
    let permit = tokio::select! {
        permit = admitted => permit,
        () = context.stopping.cancelled() => {
            tracing::debug!("node stopping: returning request to its queue");
            settle(context, delivery, Settlement::Requeue).await;
            return None;
        }
        () = context.lost.cancelled() => {
            tracing::debug!("session lost before the request ran: the broker hands it out again");
            return None;
        }
    };
    tracing::debug!(redelivered = delivery.redelivered, "running");
    let running = context.stats.run();
    let reply = tokio::select! {
        reply = run(context, &module, &delivery.data, deadline) => reply,
        // Dropping the call stops the guest at once and frees its slot for
        // the requests of the next session.
        () = context.lost.cancelled() => {
            tracing::debug!("session lost while the request ran: stopped it; the broker hands it out again");
            return None;
        }
    };
    drop((running, permit));
    Some(Outcome {
        reply,
        settlement: Settlement::Ack,
        ran: Some(module.name.clone()),
    })
}

async fn run(
    context: &Context,
    module: &LoadedModule,
    input: &[u8],
    deadline: Option<Instant>,
) -> Reply {
    let started = Instant::now();
    let result = module.module.call(input, deadline).await;
    context.metrics.ran(&module.name, started.elapsed());
    let reply = match result {
        Ok(output) => Reply {
            content_type: Some(module.content_type.clone()),
            ..Reply::ok(output)
        },
        Err(error) => {
            if let Some(limit) = Limit::of(&error) {
                context.metrics.tripped(&module.name, limit);
            }
            Reply::error(ErrorKind::from(&error), format!("{}: {error}", module.name))
        }
    };
    Reply {
        version: Some(module.version.clone()),
        ..reply
    }
}

/// Sends `reply` to the delivery's caller, then settles the delivery as
/// `settlement` says, unless the reply could not go out. Returns the reply
/// the caller got, if it got one.
///
/// A reply the broker refuses costs only its own request: one too large for
/// the broker is replaced by a `too_large` error; one refused for any other
/// reason (a malformed `reply_to`, say) is dead-lettered, since it would fail
/// the same way every time. A reply path that is down returns the request to
/// its queue; a session lost meanwhile leaves it to the broker.
async fn answer(
    context: &Context,
    delivery: &Delivery,
    mut reply: Reply,
    settlement: Settlement,
) -> Option<Reply> {
    let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
        settle(context, delivery, settlement).await;
        return None;
    };
    let reply_to = reply_to.as_str();
    let correlation_id = delivery.properties.correlation_id().as_ref();
    loop {
        let sent = context
            .replies
            .send(
                reply_to,
                reply.properties(correlation_id),
                &reply.body,
                &context.lost,
            )
            .await;
        let settlement = match sent {
            Ok(()) => {
                settle(context, delivery, settlement).await;
                return Some(reply);
            }
            Err(ReplyError::TooLarge { size, limit }) if reply.error.is_none() => {
                tracing::warn!(
                    size,
                    limit,
                    "the reply is larger than the broker accepts: answering too_large"
                );
                let module = delivery.routing_key.as_str();
                if let Ok(name) = module.parse() {
                    context.metrics.tripped(&name, Limit::Reply);
                }
                reply = Reply {
                    version: reply.version.take(),
                    trace: reply.trace.take(),
                    ..Reply::error(
                        ErrorKind::TooLarge,
                        format!(
                            "{module}: reply of {size} bytes is over the broker's message size limit of {limit} bytes"
                        ),
                    )
                };
                continue;
            }
            Err(ReplyError::Abandoned) => {
                tracing::debug!(
                    "session lost before the reply went out: the broker hands the request out again"
                );
                return None;
            }
            Err(error @ (ReplyError::Refused(_) | ReplyError::TooLarge { .. })) => {
                tracing::error!(
                    reply_to = %Escaped(reply_to),
                    "{error}: rejecting the request so that it cannot cycle (a module queue dead-letters it)"
                );
                Settlement::DeadLetter
            }
            Err(error @ ReplyError::Unavailable(_)) => {
                tracing::warn!("{error}: returning the request to its queue");
                Settlement::Requeue
            }
        };
        settle(context, delivery, settlement).await;
        return None;
    }
}

/// Answers a request left in the queue of a module no node serves (see
/// `node::subscriptions::retire`): `not_found`, or `load_failed` with
/// `failure`, why this node could not load it. Settles it.
pub(crate) async fn answer_unserved(
    context: &Context,
    delivery: &Delivery,
    name: &ModuleName,
    failure: Option<&str>,
) {
    let reply = match failure {
        None => Reply::error(
            ErrorKind::NotFound,
            format!("no node serves module {:?} any more", name.as_str()),
        ),
        Some(why) => load_failed(name, why),
    };
    let kind = reply.error;
    if answer(context, delivery, reply, Settlement::Ack)
        .await
        .is_some()
    {
        // A module that never loaded is counted with the unrouted requests.
        let module = failure.is_none().then_some(name);
        count(context, module, kind);
    }
}

/// How many times one request is forwarded to its module's queue before it
/// is answered `not_found`: a queue is bound within milliseconds of its
/// module's file appearing, and a request comes back through the alternate
/// exchange only while it is not.
const MAX_FORWARDS: u64 = 20;

/// Publishes a request that came through the alternate exchange to the
/// requests exchange again, where its module's queue is bound (or is about
/// to be: the module is loading), then acks it; hands it back if that fails.
async fn forward(context: &Context, delivery: &Delivery, name: &ModuleName) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let forwards = header_u64(Some(&headers), FORWARDS_HEADER)
        .ok()
        .flatten()
        .unwrap_or(0);
    if forwards >= MAX_FORWARDS {
        let reply = Reply::error(
            ErrorKind::NotFound,
            format!(
                "module {:?} is loading on a node that could not bind its queue",
                name.as_str()
            ),
        );
        if answer(context, delivery, reply, Settlement::Ack)
            .await
            .is_some()
        {
            count(context, None, Some(ErrorKind::NotFound));
        }
        return;
    }
    let mut headers = headers;
    headers.insert(
        FORWARDS_HEADER.into(),
        AMQPValue::LongLongInt(forwards as i64 + 1),
    );
    let forwarded = context
        .replies
        .forward(
            &context.requests_exchange,
            name.as_str(),
            delivery.properties.clone().with_headers(headers),
            &delivery.data,
            &context.lost,
        )
        .await;
    match forwarded {
        Ok(()) => {
            tracing::debug!("came before its module's queue was bound: forwarded there");
            settle(context, delivery, Settlement::Ack).await;
        }
        Err(ReplyError::Abandoned) => {}
        Err(error) => {
            tracing::warn!("cannot forward a request to its module's queue: {error}");
            settle(context, delivery, Settlement::Requeue).await;
        }
    }
}

/// The answer to a request for a module that this node could not load, and
/// that no node serves.
fn load_failed(name: &ModuleName, why: &str) -> Reply {
    Reply::error(
        ErrorKind::LoadFailed,
        format!("module {:?} could not be loaded: {why}", name.as_str()),
    )
}

/// Hands a delivery back to its queue unhandled.
pub(crate) async fn give_back(context: &Context, delivery: &Delivery) {
    settle(context, delivery, Settlement::Requeue).await;
}

/// Answers a message of the control queue (a fleet question, a deploy
/// order) and acks it, whatever became of the answer: the work is done, and
/// an answer lost only means that its asker hears nothing from this node.
/// The answer carries this node's broker user as its `user_id`, which the
/// broker vouches for (see `Replies::send_vouched`). `None` answers nothing.
pub(crate) async fn answer_control(context: &Context, delivery: &Delivery, reply: Option<Reply>) {
    if let (Some(reply), Some(reply_to)) = (reply, delivery.properties.reply_to().as_ref()) {
        let properties = reply.properties(delivery.properties.correlation_id().as_ref());
        let sent = context
            .replies
            .send_vouched(reply_to.as_str(), properties, &reply.body, &context.lost)
            .await;
        match sent {
            Ok(()) => {}
            // The delivery went with its session: nothing to settle.
            Err(ReplyError::Abandoned) => return,
            Err(error) => tracing::warn!(
                reply_to = %Escaped(reply_to.as_str()),
                "cannot answer on the control queue: {error}"
            ),
        }
    }
    settle(context, delivery, Settlement::Ack).await;
}

/// Sends an answer on the control queue that is not the last for its
/// message (a node compiling a deploy says so), vouched for as
/// [`answer_control`]'s are, and settles nothing.
pub(crate) async fn answer_control_pending(context: &Context, delivery: &Delivery, reply: Reply) {
    let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
        return;
    };
    let properties = reply.properties(delivery.properties.correlation_id().as_ref());
    if let Err(error) = context
        .replies
        .send_vouched(reply_to.as_str(), properties, &reply.body, &context.lost)
        .await
    {
        tracing::debug!("cannot say on the control queue that a deploy compiles: {error}");
    }
}

/// Tells the broker what became of a delivery. The only place that does.
///
/// Fails only when the delivery's channel is gone, and then the broker has
/// already returned the delivery to its queue: nothing is lost.
async fn settle(context: &Context, delivery: &Delivery, settlement: Settlement) {
    // A request set aside is rejected, one given back is nacked: from
    // RabbitMQ 4.3, `basic.reject` counts as a failed delivery (the quorum
    // queue's delivery limit counts those) and dead-letters when it does not
    // requeue, while a `basic.nack` that does not requeue may requeue anyway
    // ("undeliverable here"), and one that requeues counts nothing.
    let settled = match settlement {
        Settlement::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settlement::Requeue => {
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            delivery.nack(options).await
        }
        Settlement::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(error) = settled {
        // The channel is gone (the session is lost, or about to be noticed
        // lost): the broker has the request back already.
        let gone = context.lost.is_cancelled()
            || matches!(
                error.kind(),
                lapin::ErrorKind::InvalidChannelState(..)
                    | lapin::ErrorKind::InvalidConnectionState(_)
                    | lapin::ErrorKind::IOError(_)
            );
        if gone {
            tracing::debug!(
                ?settlement,
                "the session is lost: the broker hands the request out again"
            );
        } else {
            tracing::error!(?settlement, "failed to settle the request: {error}");
        }
    }
}

/// A request that nodes have taken `delivery_limit` times without ever
/// settling it (each died or was killed while running it) is not run again:
/// its caller hears so, and it goes to the dead-letter queue for an operator.
/// The queue's own `x-delivery-limit` catches it anyway if this node dies too.
fn poison_check(context: &Context, name: &ModuleName, delivery: &Delivery) -> Option<Reply> {
    let count = delivery_count(delivery.redelivered, delivery.properties.headers().as_ref());
    if count < u64::from(context.delivery_limit) {
        if count > 0 {
            tracing::warn!(
                delivery_count = count,
                "running a request that nodes took before and never answered"
            );
        }
        return None;
    }
    Some(Reply::error(
        ErrorKind::Poison,
        format!(
            "{name}: nodes took this request {count} times and stopped each time before replying; \
             it is not run again, and is kept in queue {:?}",
            context.dead_queue
        ),
    ))
}

/// How many times the broker delivered this request before, by what the
/// broker vouches for: a first delivery (not `redelivered`) counts 0
/// whatever headers its caller sent; a redelivery counts the most of what
/// the quorum queue stamps on it (at least 1): RabbitMQ 3.x sets
/// [`DELIVERY_COUNT_HEADER`] (every return, a dead consumer's included);
/// 4.x sets [`ACQUIRED_COUNT_HEADER`] (every hand-out) as well, and from 4.3
/// its delivery count grows only on failures a consumer reports, not when
/// its connection dies. The broker's values replace the caller's headers of
/// those names, so taking the most can only count more, never less.
fn delivery_count(redelivered: bool, headers: Option<&FieldTable>) -> u64 {
    if !redelivered {
        return 0;
    }
    [DELIVERY_COUNT_HEADER, ACQUIRED_COUNT_HEADER]
        .into_iter()
        .filter_map(|name| header_u64(headers, name).ok().flatten())
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The earliest of the deadlines the caller set with [`TIMEOUT_HEADER`]
/// (counted from `received`) and [`DEADLINE_HEADER`] (Unix milliseconds).
fn caller_deadline(
    headers: Option<&FieldTable>,
    received: Instant,
) -> Result<Option<Instant>, String> {
    let timeout = match header_u64(headers, TIMEOUT_HEADER)? {
        Some(0) => return Err(format!("header {TIMEOUT_HEADER} must be at least 1")),
        Some(ms) => Some(received + Duration::from_millis(ms)),
        None => None,
    };
    let deadline = header_u64(headers, DEADLINE_HEADER)?.map(|unix_ms| {
        let now_ms = unix_time().as_millis() as u64;
        if unix_ms >= now_ms {
            received + Duration::from_millis(unix_ms - now_ms)
        } else {
            // Already past: any instant before `received` will do, as near as
            // the clock allows to the real one so the error says how late.
            received
                .checked_sub(Duration::from_millis(now_ms - unix_ms))
                .unwrap_or(received)
        }
    });
    Ok(match (timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// The answer to a request that no module queue took.
fn unrouted(routing_key: &str) -> Reply {
    match routing_key.parse::<ModuleName>() {
        Ok(name) => Reply::error(
            ErrorKind::NotFound,
            format!("no node serves module {:?}", name.as_str()),
        ),
        Err(invalid) => Reply::error(ErrorKind::BadRequest, invalid.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};

    use super::*;

    fn headers(values: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in values {
            table.insert((*name).into(), value.clone());
        }
        table
    }

    #[test]
    fn a_first_delivery_counts_nothing_the_caller_says() {
        let forged = headers(&[
            ("x-delivery-count", AMQPValue::LongLongInt(99)),
            ("x-acquired-count", AMQPValue::LongLongInt(99)),
        ]);
        assert_eq!(delivery_count(false, Some(&forged)), 0);
        assert_eq!(delivery_count(false, None), 0);
    }

    #[test]
    fn a_redelivery_counts_what_rabbitmq_3_stamps() {
        // 3.x: x-delivery-count on every redelivery, as a long.
        let stamped = headers(&[("x-delivery-count", AMQPValue::LongLongInt(3))]);
        assert_eq!(delivery_count(true, Some(&stamped)), 3);
        // A classic queue stamps nothing: a redelivery counts one.
        assert_eq!(delivery_count(true, None), 1);
        assert_eq!(delivery_count(true, Some(&headers(&[]))), 1);
    }

    #[test]
    fn a_redelivery_counts_every_hand_out_on_rabbitmq_4() {
        // 4.3: a node that died (OOM-killed, say) left the delivery count
        // where it was; the acquired count saw every hand-out.
        let after_deaths = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(5)),
            ("x-delivery-count", AMQPValue::LongLongInt(0)),
        ]);
        assert_eq!(delivery_count(true, Some(&after_deaths)), 5);
        let only_acquired = headers(&[("x-acquired-count", AMQPValue::LongLongInt(2))]);
        assert_eq!(delivery_count(true, Some(&only_acquired)), 2);
        // Failures reported with basic.reject count in both.
        let rejected = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(4)),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
        ]);
        assert_eq!(delivery_count(true, Some(&rejected)), 4);
    }

    #[test]
    fn a_caller_cannot_lower_the_count_the_broker_stamps() {
        // On 3.x a caller's x-acquired-count survives; it cannot hide the
        // broker's x-delivery-count.
        let lowered = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(0)),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
        ]);
        assert_eq!(delivery_count(true, Some(&lowered)), 4);
        let garbage = headers(&[("x-acquired-count", AMQPValue::LongString("many".into()))]);
        assert_eq!(delivery_count(true, Some(&garbage)), 1);
    }

    #[test]
    fn a_tracestate_within_w3c_limits_is_kept_and_others_dropped() {
        let span = tracing::Span::none();
        let keep = |state: &str| trace_state(state.as_bytes(), &span).is_some();
        assert!(keep("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(keep(&"a".repeat(512)));
        assert!(!keep(&"a".repeat(513)));
        assert!(!keep(&"a".repeat(130_850)));
        assert!(keep(&vec!["k=v"; 32].join(",")));
        assert!(!keep(&vec!["k=v"; 33].join(",")));
        assert!(!keep("rojo=1\nERROR forged"));
    }

    #[test]
    fn the_largest_reply_properties_fit_the_smallest_frame() {
        // Every field a reply can carry, each at the most it can be: a
        // correlation id is a short string (255 bytes), a content type is
        // checked to 255, a tracestate kept to 512.
        let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let reply = Reply {
            body: Vec::new(),
            error: Some(ErrorKind::StackOverflow),
            version: Some("45c0e103cb52b096".into()),
            content_type: Some("a".repeat(255)),
            trace: Some((parent, Some(LongString::from("s".repeat(MAX_TRACESTATE))))),
        };
        let correlation_id = ShortString::from("c".repeat(255));
        let properties = reply
            .properties(Some(&correlation_id))
            .with_user_id("u".repeat(255).as_str().into());
        let frame = AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 0,
                properties,
            },
        );
        let mut buffer = vec![0u8; 1 << 16];
        let written = gen_frame(&frame)(WriteContext::from(buffer.as_mut_slice()))
            .unwrap()
            .position;
        // AMQP's smallest frame_max: what any broker may negotiate.
        assert!(written < 4096, "{written} bytes");
    }

    #[test]
    fn deadlines_come_from_either_header_and_the_earliest_wins() {
        let received = Instant::now();
        assert_eq!(caller_deadline(None, received), Ok(None));
        let timeout = headers(&[(TIMEOUT_HEADER, AMQPValue::LongUInt(500))]);
        assert_eq!(
            caller_deadline(Some(&timeout), received),
            Ok(Some(received + Duration::from_millis(500)))
        );
        let far = unix_time().as_millis() as u64 + 60_000;
        let both = headers(&[
            (TIMEOUT_HEADER, AMQPValue::LongString("200".into())),
            (DEADLINE_HEADER, AMQPValue::LongLongInt(far as i64)),
        ]);
        assert_eq!(
            caller_deadline(Some(&both), received),
            Ok(Some(received + Duration::from_millis(200)))
        );
        let zero = headers(&[(TIMEOUT_HEADER, AMQPValue::LongUInt(0))]);
        assert!(caller_deadline(Some(&zero), received).is_err());
        let words = headers(&[(TIMEOUT_HEADER, AMQPValue::LongString("soon".into()))]);
        assert!(caller_deadline(Some(&words), received).is_err());
    }
}
