//! One delivery, from arrival to ack: run it (or decide it cannot run), reply
//! to its caller, then ack.
//!
//! Every delivery that names a caller gets exactly one reply, success or
//! error, and only then is acked: if the node dies before the reply is
//! confirmed by the broker, the request goes back to its queue. A delivery
//! without `reply_to` has nobody to answer; it is logged and acked.

use std::sync::Arc;
use std::time::Instant;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::Instrument as _;

use crate::names::ModuleName;
use crate::node::{Shared, Source};
use crate::wire::{ERROR_HEADER, ErrorKind};

/// What goes back to the caller.
struct Reply {
    body: Vec<u8>,
    error: Option<ErrorKind>,
}

impl Reply {
    fn ok(body: Vec<u8>) -> Self {
        Reply { body, error: None }
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply {
            body: message.into().into_bytes(),
            error: Some(kind),
        }
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, source: Source, delivery: Delivery) {
    let correlation_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map_or("", ShortString::as_str)
        .to_owned();
    let span = tracing::info_span!("request", module = %delivery.routing_key, %correlation_id);
    handle_in_span(shared, source, delivery)
        .instrument(span)
        .await;
}

async fn handle_in_span(shared: Arc<Shared>, source: Source, delivery: Delivery) {
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        tracing::warn!("dropping request without reply_to: there is nobody to answer");
        ack(&delivery).await;
        return;
    };

    let started = Instant::now();
    let reply = match source {
        Source::Unrouted => unrouted(delivery.routing_key.as_str()),
        Source::Module(name) => {
            // Wait for a slot, unless the node stops first: then the request
            // goes back to its queue for another node.
            let permit = tokio::select! {
                permit = shared.slots.acquire() => permit.expect("the slots semaphore is never closed"),
                () = shared.stopping.cancelled() => {
                    tracing::debug!("node stopping: returning request to its queue");
                    nack(&delivery).await;
                    return;
                }
            };
            tracing::debug!(redelivered = delivery.redelivered, "running");
            let reply = run(&shared, &name, &delivery.data).await;
            drop(permit);
            reply
        }
    };

    let elapsed_ms = (started.elapsed().as_secs_f64() * 1e5).round() / 100.0;
    match reply.error {
        None => tracing::info!(elapsed_ms, "served"),
        Some(kind) => tracing::warn!(
            elapsed_ms,
            error = %kind,
            message = %String::from_utf8_lossy(&reply.body),
            "failed"
        ),
    }
    if publish(&shared, &delivery, reply_to.as_str(), reply).await {
        ack(&delivery).await;
    } else {
        nack(&delivery).await;
    }
}

async fn run(shared: &Shared, name: &ModuleName, input: &[u8]) -> Reply {
    let Some(module) = shared.registry.get(name) else {
        return Reply::error(
            ErrorKind::NotFound,
            format!("this node no longer serves module {:?}", name.as_str()),
        );
    };
    match module.module.call(input, &module.limits).await {
        Ok(output) => Reply::ok(output),
        Err(error) => Reply::error(ErrorKind::from(&error), format!("{name}: {error}")),
    }
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

/// Publishes the reply and waits for the broker to take it. Returns whether
/// it did; the caller acks only then.
async fn publish(shared: &Shared, delivery: &Delivery, reply_to: &str, reply: Reply) -> bool {
    let mut properties = BasicProperties::default();
    if let Some(correlation_id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    if let Some(kind) = reply.error {
        let mut headers = FieldTable::default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(kind.as_str())),
        );
        properties = properties
            .with_headers(headers)
            .with_content_type("text/plain; charset=utf-8".into());
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
            tracing::error!(%reply_to, "the broker refused the reply; returning the request to its queue");
            false
        }
        Err(error) => {
            tracing::error!(%reply_to, "failed to publish the reply; returning the request to its queue: {error}");
            false
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        tracing::error!("failed to ack the request: {error}");
    }
}

async fn nack(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = delivery.nack(options).await {
        tracing::error!("failed to return the request to its queue: {error}");
    }
}
