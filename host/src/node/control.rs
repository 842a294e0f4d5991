//! Answers on the control exchange: who this node is and what it serves
//! (`wasmrpc ping`, `wasmrpc modules`), and deploys (`wasmrpc deploy`,
//! `undeploy`) for a node that takes them.

use std::sync::Arc;

use lapin::message::Delivery;

use super::Shared;
use crate::amqp::header_str;
use crate::deploy::{Ack, Action};
use crate::request::{self, Context, Reply};
use crate::wire::{DEPLOY_NAME_HEADER, ModuleStatus, NodeStatus};

/// Control requests are consumed without acks: an answer that does not go
/// out (the broker refused it, or the session was lost) only means this node
/// looks absent for one `wasmrpc ping`.
pub(super) async fn answer(shared: Arc<Shared>, context: Arc<Context>, delivery: Delivery) {
    if delivery.properties.reply_to().is_none() {
        tracing::debug!("ignoring a control request without reply_to");
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
            let Some(deploys) = &shared.deploys else {
                tracing::debug!("ignoring a {}: this node takes no deploys", action.as_str());
                return;
            };
            let module = header_str(delivery.properties.headers().as_ref(), DEPLOY_NAME_HEADER)
                .unwrap_or("?")
                .to_owned();
            let outcome = deploys.take(action, &delivery).await;
            let ack = match outcome {
                Ok(version) => {
                    tracing::info!(
                        %module,
                        version,
                        "took a signed {}",
                        action.as_str()
                    );
                    Ack {
                        node: shared.id.clone(),
                        host: shared.host.clone(),
                        accepted: true,
                        version,
                        reason: None,
                    }
                }
                Err(refusal) => {
                    tracing::warn!(
                        %module,
                        "refused a {}: {refusal}",
                        action.as_str()
                    );
                    Ack {
                        node: shared.id.clone(),
                        host: shared.host.clone(),
                        accepted: false,
                        version: None,
                        reason: Some(refusal.to_string()),
                    }
                }
            };
            serde_json::to_vec(&ack).expect("an ack is always JSON")
        }
    };
    request::answer_unacked(&context, &delivery, Reply::json(body)).await;
}

fn status(shared: &Shared) -> NodeStatus {
    let modules = shared
        .registry
        .all()
        .iter()
        .map(|module| {
            let calls = shared.stats.calls(&module.name);
            ModuleStatus {
                name: module.name.to_string(),
                version: module.version.clone(),
                kind: module.module.kind().to_string(),
                calls: calls.answered,
                failed: calls.failed,
            }
        })
        .collect();
    NodeStatus {
        node: shared.id.clone(),
        host: shared.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: shared.stats.uptime().as_millis() as u64,
        concurrency: shared.instances,
        running: *shared.stats.running().borrow(),
        modules,
    }
}
