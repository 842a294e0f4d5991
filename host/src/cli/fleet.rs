//! `wasmrpc ping` and `wasmrpc modules`: ask the fleet on an exchange.

use std::time::Duration;

use clap::Args;

use super::common::{Failure, Global};
use crate::client::Client;
use crate::units::parse_duration;
use crate::wire::NodeStatus;

/// List the live nodes: id, host, uptime, modules, requests in progress.
///
/// Asks every node on the exchange and waits `--wait` for the answers; a node
/// that is gone does not answer. RUNNING is the requests in progress out of
/// the most the node takes at once (4 × its `--concurrency`). Exit codes: 0
/// some node answered, 3 none did, 4 broker unreachable or refused.
///
/// Examples: `wasmrpc ping`; `wasmrpc ping --wait 2s --json`
#[derive(Debug, Args)]
pub(super) struct PingArgs {
    #[command(flatten)]
    pub(super) flags: FleetArgs,
}

/// List every live node's modules: kind, version, calls answered and failed,
/// and the modules each may call (its manifest's `calls`).
///
/// Asks every node on the exchange and waits `--wait` for the answers; a node
/// that is gone does not answer. Calls are counted per node since it started.
/// Exit codes: 0 some node answered, 3 none did, 4 broker unreachable or
/// refused.
///
/// Examples: `wasmrpc modules`; `wasmrpc modules --wait 2s --json`
#[derive(Debug, Args)]
pub(super) struct ModulesArgs {
    #[command(flatten)]
    pub(super) flags: FleetArgs,
}

/// The flags of `ping` and `modules`.
#[derive(Debug, Args)]
pub(super) struct FleetArgs {
    /// How long to wait for nodes to answer, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    wait: Duration,

    /// Print the answers as JSON, one array of node statuses.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(
    args: FleetArgs,
    global: &Global,
    with_modules: bool,
) -> Result<(), Failure> {
    let brokers = global.brokers()?;
    let client = Client::connect(&brokers, &global.exchange)
        .await
        .map_err(Failure::Broker)?;
    let nodes = client
        .fleet(args.wait)
        .await
        .map_err(|error| Failure::Broker(error.into()))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).expect("node statuses are JSON")
        );
    } else if with_modules {
        print!("{}", modules_table(&nodes));
    } else {
        print!("{}", nodes_table(&nodes));
    }
    if nodes.is_empty() {
        return Err(Failure::Timeout(anyhow::anyhow!(
            "no node answered within {:.1} s on exchange {:?} at {brokers}",
            args.wait.as_secs_f64(),
            global.exchange,
        )));
    }
    Ok(())
}

fn nodes_table(nodes: &[NodeStatus]) -> String {
    let rows = nodes.iter().map(|node| {
        vec![
            node.node.clone(),
            node.host.clone(),
            uptime(node.uptime_ms),
            node.modules.len().to_string(),
            format!("{}/{}", node.running, node.instances),
        ]
    });
    table(&["NODE", "HOST", "UPTIME", "MODULES", "RUNNING"], rows)
}

fn modules_table(nodes: &[NodeStatus]) -> String {
    let rows = nodes.iter().flat_map(|node| {
        let placeholder = (node.modules.is_empty()).then(|| {
            vec![
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "0".to_owned(),
                "0".to_owned(),
                "-".to_owned(),
            ]
        });
        node.modules
            .iter()
            .map(|module| {
                vec![
                    module.name.clone(),
                    module.kind.clone(),
                    module.version.clone(),
                    module.calls.to_string(),
                    module.failed.to_string(),
                    match module.may_call.is_empty() {
                        true => "-".to_owned(),
                        false => module.may_call.join(","),
                    },
                ]
            })
            .chain(placeholder)
            .map(move |module| {
                [node.node.clone(), node.host.clone(), uptime(node.uptime_ms)]
                    .into_iter()
                    .chain(module)
                    .collect()
            })
    });
    table(
        &[
            "NODE", "HOST", "UPTIME", "MODULE", "KIND", "VERSION", "CALLS", "FAILED", "MAY CALL",
        ],
        rows,
    )
}

/// Left-aligned columns, two spaces apart, with a header line.
pub(super) fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `3d04h`, `1h02m`, `5m07s`, `12s`.
pub(super) fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{:02}s", s % 60),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_at_a_glance() {
        assert_eq!(uptime(12_345), "12s");
        assert_eq!(uptime(307_000), "5m07s");
        assert_eq!(uptime(3_720_000), "1h02m");
        assert_eq!(uptime(273_600_000), "3d04h");
    }
}
