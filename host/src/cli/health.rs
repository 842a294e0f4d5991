//! `wasmrpc health`: ask a node's `/readyz`, for container health checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;

use super::common::Failure;

/// Exit 0 if the node's HTTP endpoint says it is ready, 1 otherwise.
///
/// Asks `/readyz` on the node's `--http` address (an unspecified address
/// such as `0.0.0.0` means this machine) and prints why the node is not
/// ready, or why it could not be asked, on stderr. Made for the health
/// checks of containers that have no shell or curl.
///
/// Exit codes: 0 ready, 1 not ready or not answering, 2 bad usage.
///
/// Example: `wasmrpc health` (a node started by `scripts/run`), or
/// `wasmrpc health --http 127.0.0.1:9091`
#[derive(Debug, Args)]
pub(super) struct HealthArgs {
    /// The node's HTTP address, as given to `serve --http` (the same
    /// variable sets both); `scripts/run` serves on 127.0.0.1:9090.
    #[arg(long, env = "WASMRPC_HTTP", default_value = "127.0.0.1:9090")]
    http: SocketAddr,

    /// How long to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = crate::units::parse_duration)]
    timeout: Duration,
}

pub(super) fn run(args: HealthArgs) -> Result<(), Failure> {
    let url = format!("http://{}/readyz", reachable(args.http));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(args.timeout))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .map_err(|error| Failure::Failed(anyhow::anyhow!("no answer from {url}: {error}")))?;
    let status = response.status();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure::Failed(anyhow::anyhow!(
            "not ready ({status}): {}",
            body.trim()
        )))
    }
}

/// The address to connect to for a node listening on `addr`: a node
/// listening on every interface is asked on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}
