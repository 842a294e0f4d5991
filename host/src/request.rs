//! One delivery, from arrival to ack: run it (or decide it cannot run), reply
//! to its caller, then ack.
//!
//! Every delivery that names a caller gets exactly one reply, success or
//! error, and only then is settled: if the node dies before the broker has
//! confirmed the reply, the request goes back to its queue. A delivery
//! without `reply_to` has nobody to answer; it is logged and acked.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::Instrument as _;

use crate::amqp::header_u64;
use crate::names::ModuleName;
use crate::node::Shared;
use crate::registry::LoadedModule;
use crate::wire::{
    DEADLINE_HEADER, DELIVERY_COUNT_HEADER, ERROR_HEADER, ErrorKind, TIMEOUT_HEADER, VERSION_HEADER,
};

/// What goes back to the caller.
pub(crate) struct Reply {
    body: Vec<u8>,
    error: Option<ErrorKind>,
    /// The version of the module that produced it, if one did.
    version: Option<String>,
    content_type: Option<&'static str>,
}

impl Reply {
    fn ok(body: Vec<u8>) -> Self {
        Reply {
            body,
            error: None,
            version: None,
            content_type: None,
        }
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply {
            body: message.into().into_bytes(),
            error: Some(kind),
            version: None,
            content_type: Some("text/plain; charset=utf-8"),
        }
    }

    pub(crate) fn json(body: Vec<u8>) -> Self {
        Reply {
            content_type: Some("application/json"),
            ..Reply::ok(body)
        }
    }
}

/// What a delivery is for.
pub(crate) enum Target {
    /// A module, in the version served when the request arrived.
    Module(Arc<LoadedModule>),
    /// No module queue took it: it came through the alternate exchange.
    Unrouted,
}

/// What happens to the delivery once its reply is out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    /// Reject without requeueing: the queue dead-letters it.
    DeadLetter,
}

pub(crate) async fn handle(shared: Arc<Shared>, target: Target, delivery: Delivery) {
    let correlation_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map_or("", ShortString::as_str)
        .to_owned();
    let span = tracing::info_span!("request", module = %delivery.routing_key, %correlation_id);
    handle_in_span(shared, target, delivery)
        .instrument(span)
        .await;
}

async fn handle_in_span(shared: Arc<Shared>, target: Target, delivery: Delivery) {
    let received = Instant::now();
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        tracing::warn!("dropping request without reply_to: there is nobody to answer");
        ack(&delivery).await;
        return;
    };

    let (reply, settle) = match target {
        Target::Unrouted => (unrouted(delivery.routing_key.as_str()), Settle::Ack),
        Target::Module(module) => match poison_check(&shared, &module.name, &delivery) {
            Some(reply) => (reply, Settle::DeadLetter),
            None => match caller_deadline(delivery.properties.headers().as_ref(), received) {
                Err(message) => (
                    Reply::error(ErrorKind::BadRequest, format!("{}: {message}", module.name)),
                    Settle::Ack,
                ),
                Ok(deadline) => {
                    // Wait for a slot, unless the node stops first: then the
                    // request goes back to its queue for another node.
                    let permit = tokio::select! {
                        permit = shared.slots.acquire() => permit.expect("the slots semaphore is never closed"),
                        () = shared.stopping.cancelled() => {
                            tracing::debug!("node stopping: returning request to its queue");
                            nack(&delivery, true).await;
                            return;
                        }
                    };
                    tracing::debug!(redelivered = delivery.redelivered, version = %module.version, "running");
                    let running = shared.stats.run();
                    let reply = run(&module, &delivery.data, deadline).await;
                    drop((running, permit));
                    shared.stats.record(&module.name, reply.error.is_some());
                    (reply, Settle::Ack)
                }
            },
        },
    };

    let elapsed_ms = (received.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    match reply.error {
        None => tracing::info!(elapsed_ms, "served"),
        Some(kind) => tracing::warn!(
            elapsed_ms,
            error = %kind,
            message = %String::from_utf8_lossy(&reply.body),
            "failed"
        ),
    }
    let correlation_id = delivery.properties.correlation_id().as_ref();
    if !publish(&shared, correlation_id, reply_to.as_str(), reply).await {
        nack(&delivery, true).await;
    } else if settle == Settle::DeadLetter {
        nack(&delivery, false).await;
    } else {
        ack(&delivery).await;
    }
}

async fn run(module: &LoadedModule, input: &[u8], deadline: Option<Instant>) -> Reply {
    let reply = match module.module.call(input, deadline).await {
        Ok(output) => Reply::ok(output),
        Err(error) => Reply::error(ErrorKind::from(&error), format!("{}: {error}", module.name)),
    };
    Reply {
        version: Some(module.version.clone()),
        ..reply
    }
}

/// Answers `not_found` to a request left in the queue of a module no node
/// serves any more (see `node::subscriptions::retire`), and acks it.
pub(crate) async fn answer_unserved(shared: &Shared, delivery: &Delivery, name: &ModuleName) {
    if let Some(reply_to) = delivery.properties.reply_to() {
        let reply = Reply::error(
            ErrorKind::NotFound,
            format!("no node serves module {:?} any more", name.as_str()),
        );
        publish(
            shared,
            delivery.properties.correlation_id().as_ref(),
            reply_to.as_str(),
            reply,
        )
        .await;
    }
    ack(delivery).await;
}

/// A request that nodes have taken `delivery_limit` times without ever
/// settling it (each died or was killed while running it) is not run again:
/// its caller hears so, and it goes to the dead-letter queue for an operator.
/// The queue's own `x-delivery-limit` catches it anyway if this node dies too.
fn poison_check(shared: &Shared, name: &ModuleName, delivery: &Delivery) -> Option<Reply> {
    let count = header_u64(
        delivery.properties.headers().as_ref(),
        DELIVERY_COUNT_HEADER,
    )
    .ok()??;
    if count < u64::from(shared.delivery_limit) {
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
            shared.topology.dead_queue()
        ),
    ))
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
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
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

/// Publishes a reply and waits for the broker to take it. Returns whether
/// it did; the caller settles the request only then.
pub(crate) async fn publish(
    shared: &Shared,
    correlation_id: Option<&ShortString>,
    reply_to: &str,
    reply: Reply,
) -> bool {
    let mut properties = BasicProperties::default();
    if let Some(correlation_id) = correlation_id {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    let mut headers = FieldTable::default();
    if let Some(kind) = reply.error {
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(kind.as_str())),
        );
    }
    if let Some(version) = &reply.version {
        headers.insert(
            VERSION_HEADER.into(),
            AMQPValue::LongString(LongString::from(version.as_str())),
        );
    }
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    if let Some(content_type) = reply.content_type {
        properties = properties.with_content_type(content_type.into());
    }
    let confirm = shared
        .replies
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            &reply.body,
            properties,
        )
        .await;
    let confirmation = match confirm {
        Ok(confirm) => confirm.await,
        Err(error) => Err(error),
    };
    match confirmation {
        Ok(confirmation) if confirmation.is_ack() => true,
        Ok(_) => {
            tracing::error!(%reply_to, "the broker refused the reply");
            false
        }
        Err(error) => {
            tracing::error!(%reply_to, "failed to publish the reply: {error}");
            false
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        tracing::error!("failed to ack the request: {error}");
    }
}

async fn nack(delivery: &Delivery, requeue: bool) {
    let options = BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.nack(options).await {
        tracing::error!("failed to settle the request: {error}");
    }
}
