//! Answers to fleet questions on the control exchange: who this node is and
//! what it serves (`wasmrpc ping`, `wasmrpc modules`).

use std::sync::Arc;

use lapin::message::Delivery;

use super::Shared;
use crate::request::{self, Context, Reply};
use crate::wire::{ModuleStatus, NodeStatus};

/// Control requests are consumed without acks: an answer that does not go
/// out (the broker refused it, or the session was lost) only means this node
/// looks absent for one `wasmrpc ping`.
pub(super) async fn answer(shared: Arc<Shared>, context: Arc<Context>, delivery: Delivery) {
    if delivery.properties.reply_to().is_none() {
        tracing::debug!("ignoring a control request without reply_to");
        return;
    }
    let body = serde_json::to_vec(&status(&shared)).expect("a node status is always JSON");
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
