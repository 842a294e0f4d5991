//! Answers on the control exchange: who this node is and what it serves
//! (`wasmrpc ping`, `wasmrpc modules`), and deploy orders (`wasmrpc deploy`,
//! `undeploy`) for a node that takes them.
//!
//! The control queue is consumed with acks and a small prefetch of its own
//! ([`PREFETCH`]): a node holds at most that many control messages, so a
//! flood of large orders costs it that many bodies in memory, and orders are
//! taken one at a time (see `deploys`); the queue itself holds little (see
//! `amqp::ControlLimit`). Each message is acked once answered.

use std::sync::Arc;

use lapin::message::Delivery;

use super::shared::Shared;
use crate::deploy::{self, Ack, Action};
use crate::logging::Escaped;
use crate::request::{self, Context};
use crate::settler::Ticket;
use crate::wire::reply::Response;
use crate::wire::{ModuleStatus, NodeStatus};

/// Control messages a node holds unacked at once: fleet questions are
/// answered at once, orders wait for their turn.
pub(super) const PREFETCH: u16 = 2;

pub(super) async fn answer(
    shared: Arc<Shared>,
    context: Arc<Context>,
    mut delivery: Delivery,
    ticket: Ticket,
) {
    if delivery.properties.reply_to().is_none() {
        tracing::debug!("ignoring a control message without reply_to");
        request::answer_control(&context, &delivery, ticket, None).await;
        return;
    }
    let action = delivery
        .properties
        .kind()
        .as_ref()
        .and_then(|kind| Action::parse(kind.as_str()));
    let body = match action {
        None => serde_json::to_vec(&status(&shared)).expect("a node status is always JSON"),
        Some(action) => {
            let Some(deploys) = &shared.modules.deploys else {
                tracing::debug!("ignoring a {}: this node takes no deploys", action.as_str());
                request::answer_control(&context, &delivery, ticket, None).await;
                return;
            };
            let module = deploy::named_in(&delivery.properties)
                .unwrap_or("?")
                .to_owned();
            let order = deploy::order_in(&delivery.properties)
                .unwrap_or_default()
                .to_owned();
            let body = std::mem::take(&mut delivery.data);
            // While it compiles, the deployer hears that it does.
            let (compiling, started) = tokio::sync::oneshot::channel();
            let pending = async {
                if started.await.is_ok() {
                    let ack = Ack {
                        node: shared.identity.id.clone(),
                        host: shared.identity.host.clone(),
                        order: order.clone(),
                        accepted: false,
                        pending: true,
                        version: None,
                        reason: None,
                    };
                    let body = serde_json::to_vec(&ack).expect("an ack is always JSON");
                    request::answer_control_pending(&context, &delivery, Response::json(body))
                        .await;
                }
            };
            let (outcome, ()) = tokio::join!(
                deploys.take(action, &delivery.properties, body, compiling),
                pending
            );
            let ack = match outcome {
                Ok(version) => {
                    tracing::info!(
                        module = %Escaped(&module),
                        order = %Escaped(&order),
                        version,
                        "took a signed {}",
                        action.as_str()
                    );
                    Ack {
                        node: shared.identity.id.clone(),
                        host: shared.identity.host.clone(),
                        order,
                        accepted: true,
                        pending: false,
                        version,
                        reason: None,
                    }
                }
                Err(refusal) => {
                    tracing::warn!(
                        module = %Escaped(&module),
                        order = %Escaped(&order),
                        "refused a {}: {refusal}",
                        action.as_str()
                    );
                    Ack {
                        node: shared.identity.id.clone(),
                        host: shared.identity.host.clone(),
                        order,
                        accepted: false,
                        pending: false,
                        version: None,
                        reason: Some(refusal.to_string()),
                    }
                }
            };
            serde_json::to_vec(&ack).expect("an ack is always JSON")
        }
    };
    request::answer_control(&context, &delivery, ticket, Some(Response::json(body))).await;
}

fn status(shared: &Shared) -> NodeStatus {
    let modules = shared
        .modules
        .registry
        .all()
        .iter()
        .map(|module| {
            let calls = shared.shown.stats.calls(&module.name);
            ModuleStatus {
                name: module.name.to_string(),
                version: module.version.clone(),
                kind: module.module.kind().to_string(),
                calls: calls.answered,
                failed: calls.failed,
                may_call: module.calls.to_list(),
            }
        })
        .collect();
    NodeStatus {
        node: shared.identity.id.clone(),
        host: shared.identity.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: shared.shown.stats.uptime().as_millis() as u64,
        concurrency: shared.identity.concurrency,
        instances: shared.identity.instances,
        running: *shared.shown.stats.running().borrow(),
        accepts_deploys: shared.modules.deploys.is_some(),
        takes_deploys: shared.modules.deploys.is_some(),
        deploy_limit: shared
            .modules
            .deploys
            .as_ref()
            .map(|deploys| deploys.max_size as u64),
        modules,
    }
}
