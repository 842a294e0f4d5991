//! One delivery, from arrival to settlement: run it (or decide it cannot
//! run), reply to its caller, then settle it with the broker.
//!
//! Every delivery that names a caller gets exactly one reply, success or
//! error, and only then is settled: if the node dies before the broker has
//! confirmed the reply, the request goes back to its queue. A delivery
//! without `reply_to` has nobody to answer; it is logged and acked.
//!
//! A delivery is decoded once into a [`Request`] and comes with its
//! [`Ticket`], which the task settles once its reply is confirmed (or leaves
//! unsettled if the session is lost); the [`crate::settler`] says it to the
//! broker. A request task sees the node only through its [`Context`]: what
//! every request of the node uses ([`Requests`]: the reply path, admission,
//! the counts, the node stopping) and its session's `lost` signal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::children::{ChildCalls, Children};
use crate::logging::{Burst, Escaped};
use crate::metrics::{Limit, Metrics};
use crate::names::ModuleName;
use crate::registry::LoadedModule;
use crate::replies::{Replies, ReplyError};
use crate::runtime::{CallError, Calling};
use crate::settler::Settlement;
use crate::settler::Ticket;
use crate::stats::Stats;
use crate::wire::reply::Response;
use crate::wire::request::{Request, Stamps};
use crate::wire::{ErrorKind, FORWARDS_HEADER, UNROUTED_HEADER, unix_time};

/// A line about a request at `$level`, naming it (module and correlation
/// id, escaped: both come from the caller), since its span is at debug and
/// may be off.
macro_rules! request_event {
    ($level:ident, $request:expr, $($rest:tt)+) => {
        tracing::$level!(
            module = %Escaped($request.routing_key.as_str()),
            correlation_id = %Escaped($request.correlation_id_str()),
            $($rest)+
        )
    };
}

/// What a request task may use of the node: what every request of the node
/// shares, and the session its delivery came on.
pub(crate) struct Context {
    pub node: Arc<Requests>,
    /// Cancelled when the broker session the deliveries came on is lost:
    /// they can no longer be settled, and the broker hands them out again.
    pub lost: CancellationToken,
    /// What the session's broker stamps on the deliveries it hands out again.
    pub stamps: Stamps,
}

impl Context {
    /// The context of the requests of a new session, on a broker that
    /// stamps what `stamps` says.
    pub(crate) fn for_session(node: &Arc<Requests>, stamps: Stamps) -> Context {
        Context {
            node: node.clone(),
            lost: CancellationToken::new(),
            stamps,
        }
    }
}

/// What every request of a node uses, made once when the node starts.
pub(crate) struct Requests {
    pub replies: Arc<Replies>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    pub admission: Admission,
    /// What modules' calls to other modules go through.
    pub children: Arc<Children>,
    /// Where poison requests go, for the message that says so.
    pub dead_queue: String,
    /// Where requests are published, for one forwarded to its module.
    pub requests_exchange: String,
    /// When a line about a refused `reply_to` is due.
    pub refused_replies: Burst,
    /// Places for requests held to be looked at again ([`MAX_LOOKING_AGAIN`]).
    pub looking_again: Semaphore,
    /// Cancelled when the node begins to shut down.
    pub stopping: CancellationToken,
}

/// Which requests may run: not poison ones, and no more at once than the
/// node's instances, of which no module holds more than its share.
pub(crate) struct Admission {
    /// Deliveries after which a request is poison.
    delivery_limit: u32,
    /// Requests in progress at once (the runtime's instances, but for those
    /// kept for requests that wait for their calls to other modules).
    slots: Arc<Semaphore>,
    /// Each module's share of them, so that a module whose requests sleep
    /// or loop cannot keep the others from running. By name: the versions
    /// of a module share its share.
    per_module: usize,
    shares: Mutex<HashMap<ModuleName, Arc<Semaphore>>>,
}

/// A request's place among those in progress; given back when dropped.
pub(crate) struct Admitted {
    _share: tokio::sync::OwnedSemaphorePermit,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Admission {
    /// `instances` requests at once, half of them at most one module's.
    pub(crate) fn new(instances: usize, delivery_limit: u32) -> Admission {
        Admission {
            delivery_limit,
            slots: Arc::new(Semaphore::new(instances)),
            per_module: (instances / 2).max(1),
            shares: Mutex::default(),
        }
    }

    /// Instances no request holds now.
    pub(crate) fn slots_free(&self) -> usize {
        self.slots.available_permits()
    }

    /// Waits for a place for a request for `module`: the module's share
    /// first, so that a module at its share holds no instance another
    /// module could use.
    async fn admit(&self, module: &ModuleName) -> Admitted {
        let share = self
            .share(module)
            .acquire_owned()
            .await
            .expect("shares are never closed");
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("slots are never closed");
        Admitted {
            _share: share,
            _slot: slot,
        }
    }

    /// A place for a request for `module` if one is free now: the common
    /// case, which needs no wait to be set up and torn down.
    fn try_admit(&self, module: &ModuleName) -> Option<Admitted> {
        let share = self.share(module).try_acquire_owned().ok()?;
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        Some(Admitted {
            _share: share,
            _slot: slot,
        })
    }

    fn share(&self, module: &ModuleName) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().expect("shares lock");
        shares
            .entry(module.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_module)))
            .clone()
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

pub(crate) async fn handle(
    context: Arc<Context>,
    target: Target,
    delivery: Delivery,
    ticket: Ticket,
) {
    let received = Instant::now();
    let request = Request::decode(
        &delivery.routing_key,
        &delivery.properties,
        (delivery.redelivered, context.stamps),
        received,
        unix_time(),
    );
    // At debug: a span costs a busy node only when its level is on. Lines
    // above debug name the request themselves (see `request_event!`).
    // Both fields come from the caller: escaped, they cannot forge a line.
    let span = tracing::debug_span!(
        "request",
        module = %Escaped(request.routing_key.as_str()),
        correlation_id = %Escaped(request.correlation_id_str()),
        version = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(trace) = &request.trace {
        span.record("trace_id", trace.parent.trace_id());
        span.record("span_id", trace.parent.span_id());
    }
    if let Some(why) = &request.trace_ignored {
        // The caller's business: it costs a debug line, never the request.
        tracing::debug!(parent: &span, "ignoring {why}");
    }
    handle_in_span(&context, target, &request, delivery, ticket, received)
        .instrument(span)
        .await;
}

async fn handle_in_span(
    context: &Context,
    target: Target,
    request: &Request,
    delivery: Delivery,
    ticket: Ticket,
    received: Instant,
) {
    let module = match &target {
        Target::Module(module) => {
            tracing::Span::current().record("version", module.version.as_str());
            if let Some(wait) = request.queued {
                context.node.metrics.waited(&module.name, wait);
            }
            Some(module.name.clone())
        }
        Target::Unrouted | Target::Forward(_) | Target::Failed(..) => None,
    };
    if request.reply_to.is_none() {
        request_event!(
            warn,
            request,
            "dropping request without reply_to: there is nobody to answer"
        );
        ticket.settle(Settlement::Ack);
        count(context, module.as_ref(), Some(ErrorKind::BadRequest));
        return;
    }
    let mut outcome = match target {
        Target::Unrouted => {
            if let Some(name) = worth_another_look(context, request) {
                look_again(context, request, &delivery, ticket, &name).await;
                return;
            }
            Outcome {
                reply: unrouted(delivery.routing_key.as_str()),
                settlement: Settlement::Ack,
            }
        }
        Target::Failed(name, why) => Outcome {
            reply: load_failed(&name, &why),
            settlement: Settlement::Ack,
        },
        Target::Forward(name) => {
            forward(context, request, &delivery, ticket, &name).await;
            return;
        }
        Target::Module(module) => match run_module(context, module, request, &delivery).await {
            Handled::Answer(outcome) => outcome,
            Handled::GiveBack => {
                ticket.settle(Settlement::Requeue);
                return;
            }
            Handled::Lost => {
                ticket.abandon();
                return;
            }
        },
    };
    outcome.reply.trace = request.trace.clone();

    let Some(reply) = answer(
        context,
        request,
        module.as_ref(),
        ticket,
        outcome.reply,
        outcome.settlement,
    )
    .await
    else {
        return;
    };
    // The stats (`wasmrpc modules`) count what the metrics count: every
    // answered request for a module served, refused ones included.
    if let Some(name) = &module {
        context.node.stats.record(name, reply.error.is_some());
    }
    count(context, module.as_ref(), reply.error);
    let elapsed_ms = (received.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    match reply.error {
        // At info, a line per call would cost a busy node a third of its
        // CPU (measured: 100 µs a call against 71 µs without).
        None => tracing::debug!(elapsed_ms, "served"),
        Some(kind) => request_event!(
            warn,
            request,
            version = reply.version.as_deref(),
            trace_id = request.trace.as_ref().map(|trace| trace.parent.trace_id()),
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
        Some(module) => context.node.metrics.answered(module, error),
        None => context
            .node
            .metrics
            .unrouted(error.unwrap_or(ErrorKind::NotFound)),
    }
}

/// What a request comes to before its reply goes out.
struct Outcome {
    reply: Response,
    settlement: Settlement,
}

/// What became of a request for a module.
enum Handled {
    /// It ran, or was refused: this is its answer.
    Answer(Outcome),
    /// The node is stopping: back to its queue, for another node.
    GiveBack,
    /// The session was lost: the broker has it back already.
    Lost,
}

/// Runs a request for `module`, unless it is poison or its headers are
/// malformed.
async fn run_module(
    context: &Context,
    module: Arc<LoadedModule>,
    request: &Request,
    delivery: &Delivery,
) -> Handled {
    if let Some(reply) = poison_check(context, &module.name, request) {
        return Handled::Answer(Outcome {
            reply,
            settlement: Settlement::DeadLetter,
        });
    }
    // As if it broke while it ran: after the poison check.
    #[cfg(feature = "fault-injection")]
    if crate::amqp::header_str(
        delivery.properties.headers().as_ref(),
        "x-wasmrpc-test-panic",
    )
    .is_some()
    {
        panic!("the request asked its task to panic (fault injection)");
    }
    let deadline = match &request.deadline {
        Ok(deadline) => *deadline,
        Err(message) => {
            return Handled::Answer(Outcome {
                reply: Response::error(
                    ErrorKind::BadRequest,
                    format!("{}: {message}", module.name),
                ),
                settlement: Settlement::Ack,
            });
        }
    };
    // On arrival, not when a slot frees: a body over the limit is never
    // held while it waits.
    let limit = module.module.limits().request;
    if delivery.data.len() > limit {
        context.node.metrics.tripped(&module.name, Limit::Request);
        let error = CallError::InputTooLarge {
            size: delivery.data.len(),
            limit,
        };
        return Handled::Answer(Outcome {
            reply: Response {
                version: Some(module.version.clone()),
                ..Response::error(ErrorKind::from(&error), format!("{}: {error}", module.name))
            },
            settlement: Settlement::Ack,
        });
    }
    let admission = &context.node.admission;
    let free = match context.node.stopping.is_cancelled() {
        false => admission.try_admit(&module.name),
        true => None,
    };
    let permit = match free {
        Some(permit) => permit,
        None => tokio::select! {
            permit = admission.admit(&module.name) => permit,
            () = context.node.stopping.cancelled() => {
                tracing::debug!("node stopping: returning request to its queue");
                return Handled::GiveBack;
            }
            () = context.lost.cancelled() => {
                tracing::debug!("session lost before the request ran: the broker hands it out again");
                return Handled::Lost;
            }
        },
    };
    tracing::debug!(redelivered = delivery.redelivered, "running");
    let running = context.node.stats.run();
    let reply = tokio::select! {
        reply = run(context, &module, request, &delivery.data, deadline, permit) => reply,
        // Dropping the call stops the guest at once and frees its slot for
        // the requests of the next session.
        () = context.lost.cancelled() => {
            tracing::debug!("session lost while the request ran: stopped it; the broker hands it out again");
            return Handled::Lost;
        }
    };
    drop(running);
    Handled::Answer(Outcome {
        reply,
        settlement: Settlement::Ack,
    })
}

/// Runs `module` on `input` within its place among the node's requests,
/// which it gives back when done.
async fn run(
    context: &Context,
    module: &LoadedModule,
    request: &Request,
    input: &[u8],
    deadline: Option<Instant>,
    admitted: Admitted,
) -> Response {
    let started = Instant::now();
    let (result, calls) = match module.module.imports_fleet() {
        false => {
            let result = module.module.call(input, deadline).await;
            drop(admitted);
            (result, 0)
        }
        true => {
            let own = started + module.module.limits().time;
            let children = &context.node.children;
            let calls = Arc::new(ChildCalls::new(
                children.clone(),
                module.name.clone(),
                (
                    deadline.map_or(own, |deadline| deadline.min(own)),
                    request.trace.as_ref().map(|trace| trace.parent),
                ),
                (request.depth, children.limits().budget(request.budget)),
                admitted,
            ));
            let calling = Calling {
                fleet: calls.clone(),
                callees: module.calls.clone(),
            };
            // The request's place goes with the guest's store, which holds
            // its calls: when the call returns.
            let result = module
                .module
                .call_with(input, deadline, Some(calling))
                .await;
            (result, calls.caused())
        }
    };
    context.node.metrics.ran(&module.name, started.elapsed());
    let reply = match result {
        // The caller is a module that cannot take more: its node would
        // refuse the reply anyway, after it crossed the broker.
        Ok(output)
            if request
                .reply_limit
                .is_some_and(|limit| output.len() as u64 > limit) =>
        {
            context.node.metrics.tripped(&module.name, Limit::Reply);
            Response::error(
                ErrorKind::TooLarge,
                format!(
                    "{}: output of {} bytes is more than the {} bytes its calling module can take",
                    module.name,
                    output.len(),
                    request.reply_limit.unwrap_or_default()
                ),
            )
        }
        Ok(output) => Response {
            content_type: Some(module.content_type.clone()),
            ..Response::ok(output)
        },
        Err(error) => {
            if let Some(limit) = Limit::of(&error) {
                context.node.metrics.tripped(&module.name, limit);
            }
            Response::error(ErrorKind::from(&error), format!("{}: {error}", module.name))
        }
    };
    // A caller that gave a budget gets back what this request did not use.
    let reply = Response {
        calls: request.budget.map(|_| calls),
        ..reply
    };
    Response {
        version: Some(module.version.clone()),
        ..reply
    }
}

/// Sends `reply` to the delivery's caller, then settles the delivery as
/// `settlement` says, unless the reply could not go out. Returns the reply
/// the caller got, if it got one.
///
/// A reply the broker refuses costs only its own request: one too large for
/// the broker is replaced by a `too_large` error; one whose `reply_to` is
/// refused (by the node's rules or by the broker) is acked unanswered, since
/// it would fail the same way every time. A reply path that is down returns
/// the request to its queue; a session lost meanwhile leaves it to the broker.
async fn answer(
    context: &Context,
    request: &Request,
    module: Option<&ModuleName>,
    ticket: Ticket,
    mut reply: Response,
    settlement: Settlement,
) -> Option<Response> {
    let Some(reply_to) = request.reply_to.as_ref() else {
        ticket.settle(settlement);
        return None;
    };
    let reply_to = reply_to.as_str();
    let correlation_id = request.correlation_id.as_ref();
    loop {
        let sent = context
            .node
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
                ticket.settle(settlement);
                return Some(reply);
            }
            Err(ReplyError::TooLarge { size, limit }) if reply.error.is_none() => {
                request_event!(
                    warn,
                    request,
                    size,
                    limit,
                    "the reply is larger than the broker accepts: answering too_large"
                );
                // Only a module's output can be over the limit.
                if let Some(name) = module {
                    context.node.metrics.tripped(name, Limit::Reply);
                }
                let module = module.map_or("?", ModuleName::as_str);
                reply = Response {
                    version: reply.version.take(),
                    trace: reply.trace.take(),
                    ..Response::error(
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
                ticket.abandon();
                return None;
            }
            Err(
                error @ (ReplyError::Refused(_)
                | ReplyError::Forbidden(_)
                | ReplyError::TooLarge { .. }),
            ) => {
                // Nobody can be answered: the request is done, and neither
                // runs again nor becomes a dead letter (a caller could fill
                // the dead-letter queue so). It costs a line per burst.
                let reason = match &error {
                    ReplyError::Forbidden(refusal) => refusal.as_str(),
                    _ => "broker",
                };
                context.node.metrics.reply_refused(reason);
                if let Some(left_out) = context.node.refused_replies.due() {
                    request_event!(
                        warn,
                        request,
                        reply_to = %Escaped(reply_to),
                        reason,
                        lines_left_out = left_out,
                        "{error}: acking the request unanswered (one line per burst; \
                         wasmrpc_replies_refused_total counts them all)"
                    );
                }
                Settlement::Ack
            }
            Err(error @ ReplyError::Unavailable(_)) => {
                request_event!(warn, request, "{error}: returning the request to its queue");
                Settlement::Requeue
            }
        };
        ticket.settle(settlement);
        return None;
    }
}

/// Answers a request left in the queue of a module no node serves (see
/// `node::subscriptions::retire`): `not_found`, or `load_failed` with
/// `failure`, why this node could not load it. Settles it.
pub(crate) async fn answer_unserved(
    context: &Context,
    delivery: &Delivery,
    ticket: Ticket,
    name: &ModuleName,
    failure: Option<&str>,
) {
    let reply = match failure {
        None => Response::error(
            ErrorKind::NotFound,
            format!("no node serves module {:?} any more", name.as_str()),
        ),
        Some(why) => load_failed(name, why),
    };
    let kind = reply.error;
    let request = Request::decode(
        &delivery.routing_key,
        &delivery.properties,
        (delivery.redelivered, context.stamps),
        Instant::now(),
        unix_time(),
    );
    if answer(context, &request, None, ticket, reply, Settlement::Ack)
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

/// How long a node that knows nothing of a module waits before it
/// publishes a request for it once more: a node that has just found the
/// module's file binds its queue within milliseconds.
const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(250);

/// The most requests a node holds to look at again at once; past it, they
/// are answered `not_found` at once (a flood of calls to modules nobody has
/// costs a node no more than this).
pub(crate) const MAX_LOOKING_AGAIN: usize = 16;

/// The module of a request for a module this node knows nothing of, if it
/// is worth publishing once more: it is a module name, it was not published
/// again already, and the node has room to hold it meanwhile.
fn worth_another_look(context: &Context, request: &Request) -> Option<ModuleName> {
    let name = request.routing_key.as_str().parse::<ModuleName>().ok()?;
    (request.unrouted == 0 && context.node.looking_again.available_permits() > 0).then_some(name)
}

/// Publishes a request for a module no node seemed to know once more, after
/// [`LOOK_AGAIN_AFTER`]: it reaches the module's queue if a node bound it
/// meanwhile (it found the module's file, or a deploy of it), or comes back
/// through the alternate exchange marked, to be answered by whichever node
/// takes it then (`not_found`, or what that node knows).
async fn look_again(
    context: &Context,
    request: &Request,
    delivery: &Delivery,
    ticket: Ticket,
    name: &ModuleName,
) {
    let Ok(_held) = context.node.looking_again.try_acquire() else {
        // Taken meanwhile: answered as if it had come back.
        let reply = unrouted(name.as_str());
        if answer(context, request, None, ticket, reply, Settlement::Ack)
            .await
            .is_some()
        {
            count(context, None, Some(ErrorKind::NotFound));
        }
        return;
    };
    tokio::select! {
        () = tokio::time::sleep(LOOK_AGAIN_AFTER) => {}
        () = context.lost.cancelled() => return ticket.abandon(),
        () = context.node.stopping.cancelled() => return ticket.settle(Settlement::Requeue),
    }
    let hops = (UNROUTED_HEADER, request.unrouted + 1);
    republish(context, request, delivery, ticket, name, hops).await;
}

/// Publishes a request that came through the alternate exchange to the
/// requests exchange again, where its module's queue is bound (or is about
/// to be: the module is loading), then acks it; hands it back if that fails.
async fn forward(
    context: &Context,
    request: &Request,
    delivery: &Delivery,
    ticket: Ticket,
    name: &ModuleName,
) {
    let forwards = request.forwards;
    if forwards >= MAX_FORWARDS {
        let reply = Response::error(
            ErrorKind::NotFound,
            format!(
                "module {:?} is loading on a node that could not bind its queue",
                name.as_str()
            ),
        );
        if answer(context, request, None, ticket, reply, Settlement::Ack)
            .await
            .is_some()
        {
            count(context, None, Some(ErrorKind::NotFound));
        }
        return;
    }
    republish(
        context,
        request,
        delivery,
        ticket,
        name,
        (FORWARDS_HEADER, forwards + 1),
    )
    .await;
}

/// Publishes a delivery to the requests exchange again as it came, with the
/// header `count` says, then acks it; hands it back if that fails.
async fn republish(
    context: &Context,
    request: &Request,
    delivery: &Delivery,
    ticket: Ticket,
    name: &ModuleName,
    count: (&str, u64),
) {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        count.0.into(),
        AMQPValue::LongLongInt(i64::try_from(count.1).unwrap_or(i64::MAX)),
    );
    let forwarded = context
        .node
        .replies
        .forward(
            &context.node.requests_exchange,
            name.as_str(),
            delivery.properties.clone().with_headers(headers),
            &delivery.data,
            &context.lost,
        )
        .await;
    match forwarded {
        Ok(()) => {
            tracing::debug!(header = count.0, "published again");
            ticket.settle(Settlement::Ack);
        }
        Err(ReplyError::Abandoned) => ticket.abandon(),
        Err(error) => {
            request_event!(
                warn,
                request,
                "cannot forward a request to its module's queue: {error}"
            );
            ticket.settle(Settlement::Requeue);
        }
    }
}

/// The answer to a request for a module that this node could not load, and
/// that no node serves.
fn load_failed(name: &ModuleName, why: &str) -> Response {
    Response::error(
        ErrorKind::LoadFailed,
        format!("module {:?} could not be loaded: {why}", name.as_str()),
    )
}

/// Answers a message of the control queue (a fleet question, a deploy
/// order) and acks it, whatever became of the answer: the work is done, and
/// an answer lost only means that its asker hears nothing from this node.
/// The answer carries this node's broker user as its `user_id`, which the
/// broker vouches for (see `Replies::send_vouched`). `None` answers nothing.
pub(crate) async fn answer_control(
    context: &Context,
    delivery: &Delivery,
    ticket: Ticket,
    reply: Option<Response>,
) {
    if let (Some(reply), Some(reply_to)) = (reply, delivery.properties.reply_to().as_ref()) {
        let properties = reply.properties(delivery.properties.correlation_id().as_ref());
        let sent = context
            .node
            .replies
            .send_vouched(reply_to.as_str(), properties, &reply.body, &context.lost)
            .await;
        match sent {
            Ok(()) => {}
            // The delivery went with its session: nothing to settle.
            Err(ReplyError::Abandoned) => {
                ticket.abandon();
                return;
            }
            Err(error) => tracing::warn!(
                reply_to = %Escaped(reply_to.as_str()),
                "cannot answer on the control queue: {error}"
            ),
        }
    }
    ticket.settle(Settlement::Ack);
}

/// Sends an answer on the control queue that is not the last for its
/// message (a node compiling a deploy says so), vouched for as
/// [`answer_control`]'s are, and settles nothing.
pub(crate) async fn answer_control_pending(
    context: &Context,
    delivery: &Delivery,
    reply: Response,
) {
    let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
        return;
    };
    let properties = reply.properties(delivery.properties.correlation_id().as_ref());
    if let Err(error) = context
        .node
        .replies
        .send_vouched(reply_to.as_str(), properties, &reply.body, &context.lost)
        .await
    {
        tracing::debug!("cannot say on the control queue that a deploy compiles: {error}");
    }
}

/// A request that nodes have taken `delivery_limit` times without ever
/// settling it (each died or was killed while running it) is not run again:
/// its caller hears so, and it goes to the dead-letter queue for an operator.
/// The queue's own `x-delivery-limit` catches it anyway if this node dies too.
fn poison_check(context: &Context, name: &ModuleName, request: &Request) -> Option<Response> {
    let count = request.delivery_count;
    if count < u64::from(context.node.admission.delivery_limit) {
        if count > 0 {
            request_event!(
                warn,
                request,
                delivery_count = count,
                "running a request that nodes took before and never answered"
            );
        }
        return None;
    }
    Some(Response::error(
        ErrorKind::Poison,
        format!(
            "{name}: nodes took this request {count} times and stopped each time before replying; \
             it is not run again, and is kept in queue {:?}",
            context.node.dead_queue
        ),
    ))
}

/// The answer to a request that no module queue took.
fn unrouted(routing_key: &str) -> Response {
    match routing_key.parse::<ModuleName>() {
        Ok(name) => Response::error(
            ErrorKind::NotFound,
            format!("no node serves module {:?}", name.as_str()),
        ),
        Err(invalid) => Response::error(ErrorKind::BadRequest, invalid.to_string()),
    }
}
