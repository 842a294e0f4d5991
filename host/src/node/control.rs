//! Answers to fleet questions on the control exchange: who this node is and
//! what it serves (`wasmrpc ping`, `wasmrpc modules`).

use std::sync::Arc;

use lapin::message::Delivery;

use super::Shared;
use crate::request::{self, Reply};
use crate::wire::{ModuleStatus, NodeStatus};

pub(super) async fn answer(shared: Arc<Shared>, delivery: Delivery) {
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        tracing::debug!("ignoring a control request without reply_to");
        return;
    };
    let status = status(&shared);
    let body = serde_json::to_vec(&status).expect("a node status is always JSON");
    let reply = Reply::json(body);
    // Control requests are consumed without acks: a lost answer only means
    // this node looks absent for one `wasmrpc ping`.
    request::publish(
        &shared,
        delivery.properties.correlation_id().as_ref(),
        reply_to.as_str(),
        reply,
    )
    .await;
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
        concurrency: shared.concurrency,
        running: *shared.stats.running().borrow(),
        modules,
    }
}
