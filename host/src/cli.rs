//! The `wasmrpc` command line: flags and environment variables become a
//! validated configuration here, and nowhere else.
//!
//! Exit codes of `wasmrpc call` (also in README.md):
//! 0 the module answered; 1 the node answered with an error (kind and message
//! on stderr); 2 bad usage; 3 no reply within `--timeout`; 4 the broker could
//! not be reached or refused the request.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::amqp::{Broker, Brokers};
use crate::bench::BenchConfig;
use crate::client::{Client, ClientError};
use crate::manifest::LimitOverrides;
use crate::node::{self, Node, NodeConfig};
use crate::runtime::Limits;
use crate::units::{Bytes, parse_duration};
use crate::wire::NodeStatus;
use crate::{amqp, logging, shutdown, wire};

/// WebAssembly compute over RabbitMQ: serve modules as RPC, or call them.
///
/// A node consumes requests whose routing key names a module, runs that
/// module in a fresh sandbox and replies to the request's `reply_to` with its
/// `correlation_id`. Any AMQP client can call it; see README.md for the wire
/// contract.
#[derive(Debug, Parser)]
#[command(name = "wasmrpc", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Broker to connect to. Give several (repeat the flag, or separate them
    /// with commas) for the nodes of a RabbitMQ cluster: they are tried in
    /// turn, at start and whenever the connection is lost. A URL without
    /// `?heartbeat=N` gets a 5 s heartbeat, so a dead connection is noticed
    /// within 12.5 s.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        value_delimiter = ',',
        default_value = amqp::DEFAULT_URL,
        value_parser = clap::value_parser!(Broker),
    )]
    amqp_url: Vec<Broker>,

    /// Exchange that requests are published to; every name the node declares
    /// on the broker derives from it.
    #[arg(long, global = true, env = "WASMRPC_EXCHANGE", default_value = wire::DEFAULT_EXCHANGE)]
    exchange: String,

    /// Log filter, in RUST_LOG syntax (e.g. `debug`, `wasmrpc=debug,lapin=warn`).
    /// Defaults to `info,lapin=off` for `serve` and `warn,lapin=off` otherwise.
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(ServeArgs),
    Call(CallArgs),
    Bench(BenchArgs),
    Ping(FleetArgs),
    Modules(FleetArgs),
}

/// `ping`: list the live nodes. `modules`: list every live node's modules,
/// with their versions and the calls each answered.
///
/// Asks every node on the exchange and waits `--wait` for the answers; a node
/// that is gone does not answer. Exit codes: 0 some node answered, 3 none did,
/// 4 broker unreachable.
#[derive(Debug, Args)]
struct FleetArgs {
    /// How long to wait for nodes to answer, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    wait: Duration,

    /// Print the answers as JSON, one array of node statuses.
    #[arg(long)]
    json: bool,
}

/// Run a node: serve every `.wasm` module in a directory until SIGINT or SIGTERM.
///
/// Each `NAME.wasm` is served as module NAME. On the first signal the node
/// stops taking requests, answers those in flight and exits 0; a second
/// signal exits at once (unanswered requests return to their queues).
#[derive(Debug, Args)]
struct ServeArgs {
    /// Directory of `.wasm` modules to serve.
    #[arg(long, env = "WASMRPC_MODULES", default_value = "modules")]
    modules: PathBuf,

    /// Guests that compute at once: the cores given to guests [default:
    /// number of cores]. Four times as many requests may be in progress (a
    /// guest waiting in a host call holds no core), at most half of them one
    /// module's.
    #[arg(long, env = "WASMRPC_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: Option<u32>,

    /// Requests the broker may hand this node per module before it acks them
    /// [default: 16 × the concurrency].
    #[arg(long, env = "WASMRPC_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,

    /// Wall-clock time a request may run, e.g. `10s`, `500ms` [default: 10s].
    /// This and the other limits apply to every module whose manifest
    /// (`NAME.toml` beside `NAME.wasm`) does not set its own.
    #[arg(long, env = "WASMRPC_TIME_LIMIT", value_parser = parse_duration, help_heading = "Limits")]
    time_limit: Option<Duration>,

    /// Linear memory a request may use, e.g. `128MiB` [default: 128MiB].
    #[arg(long, env = "WASMRPC_MEMORY_LIMIT", value_parser = parse_size, help_heading = "Limits")]
    memory_limit: Option<u64>,

    /// Wasm stack a request may use, e.g. `512KiB` [default: 512KiB].
    #[arg(long, env = "WASMRPC_STACK_LIMIT", value_parser = parse_size, help_heading = "Limits")]
    stack_limit: Option<u64>,

    /// Largest request body, checked before any wasm runs [default: 1MiB].
    #[arg(long, env = "WASMRPC_REQUEST_LIMIT", value_parser = parse_size, help_heading = "Limits")]
    request_limit: Option<u64>,

    /// Largest reply body a module may produce [default: 16MiB].
    #[arg(long, env = "WASMRPC_REPLY_LIMIT", value_parser = parse_size, help_heading = "Limits")]
    reply_limit: Option<u64>,

    /// Deliveries of one request, none of them answered (the nodes died or
    /// were killed), after which it is poison: its caller is told and it is
    /// moved to the dead-letter queue. Every node on an exchange must use
    /// the same value.
    #[arg(
        long,
        env = "WASMRPC_DELIVERY_LIMIT",
        default_value_t = NodeConfig::DEFAULT_DELIVERY_LIMIT,
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = "Limits"
    )]
    delivery_limit: u32,

    /// Where compiled modules are cached between runs, so a restarted node
    /// skips the compiler [default: $XDG_CACHE_HOME/wasmrpc, else
    /// ~/.cache/wasmrpc].
    #[arg(long, env = "WASMRPC_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile every module at every start; keep nothing on disk.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,

    /// The largest message the broker accepts: its `max_message_size`
    /// (16MiB by default since RabbitMQ 4.0, 128MiB before). A reply larger
    /// than this is answered `too_large`, and no module's reply limit is
    /// higher. If the broker turns out to accept less, the node learns it
    /// from the first refusal.
    #[arg(
        long,
        env = "WASMRPC_MAX_MESSAGE_SIZE",
        default_value = "16MiB",
        value_parser = parse_size,
        help_heading = "Limits"
    )]
    max_message_size: u64,
}

/// Call a module and print its reply.
///
/// The reply body goes to stdout. An error reply prints its kind and message
/// to stderr. Exit codes: 0 answered, 1 error reply, 2 bad usage, 3 no reply
/// within --timeout, 4 broker unreachable or request refused.
#[derive(Debug, Args)]
struct CallArgs {
    /// Module to call, e.g. `fib`.
    module: String,

    /// The request body, e.g. `30`. `-` reads it from stdin; omitted, the body is empty.
    #[arg(allow_hyphen_values = true)]
    arg: Option<String>,

    /// How long to wait for the reply, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, env = "WASMRPC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// Print the reply body exactly, without adding a final newline.
    #[arg(long)]
    raw: bool,
}

/// Put a module under load: calls/s, latency percentiles, errors.
///
/// Runs `--concurrency` callers, each waiting for its reply before its next
/// call, for `--requests` calls in all or for `--duration`, and prints calls
/// answered a second, latency p50/p90/p99/max, errors by kind and replies
/// other than `--expect`. Requests go out with publisher confirms and replies
/// come by direct reply-to, as for `call`. A progress bar shows on a
/// terminal.
///
/// Example: `wasmrpc bench fib 10 --concurrency 64 --duration 10s --expect 55`
///
/// Exit codes: 0 every call answered right, 1 some were not, 2 bad usage,
/// 4 broker unreachable.
#[derive(Debug, Args)]
struct BenchArgs {
    /// Module to call, e.g. `fib`.
    module: String,

    /// The request body of every call, e.g. `10`; omitted, the body is empty.
    #[arg(allow_hyphen_values = true)]
    arg: Option<String>,

    /// Calls to make in all, instead of calling for `--duration`.
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// How long to call, e.g. `10s`, `1m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Calls in flight at once.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,

    /// The reply every call should get; any other is counted wrong.
    #[arg(long)]
    expect: Option<String>,

    /// How long one call may wait for its reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit status of `wasmrpc call` when the node answers with an error.
const EXIT_ERROR_REPLY: u8 = 1;
/// Exit status when no reply came in time.
const EXIT_TIMEOUT: u8 = 3;
/// Exit status when the broker is unreachable or refuses the request.
const EXIT_BROKER: u8 = 4;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        // lapin logs every broker error as it sees it; the node logs what it
        // did about each, once.
        Command::Serve(_) => "info,lapin=off",
        // The command reports its own errors; lapin would repeat them.
        Command::Call(_) | Command::Bench(_) | Command::Ping(_) | Command::Modules(_) => {
            "warn,lapin=off"
        }
    };
    if let Err(error) = logging::init(cli.log.as_deref().unwrap_or(default_log)) {
        eprintln!("error: {error:#}");
        return ExitCode::from(2);
    }
    if let Command::Serve(_) = cli.command {
        return_large_buffers_to_the_kernel();
    }
    let brokers = match Brokers::try_from(cli.amqp_url) {
        Ok(brokers) => brokers,
        Err(error) => {
            eprintln!("error: --amqp-url: {error}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    match cli.command {
        Command::Serve(args) => {
            let config = match serve_config(brokers.clone(), &cli.exchange, args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(2);
                }
            };
            // Guests compute on at most `concurrency` workers; one more keeps
            // the broker connections flowing whatever the guests do.
            let Some(runtime) = build(runtime.worker_threads(config.concurrency as usize + 1))
            else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Call(args) => run_on(&mut runtime, call(&brokers, &cli.exchange, args)),
        Command::Bench(args) => run_on(&mut runtime, bench(&brokers, &cli.exchange, args)),
        Command::Ping(args) => run_on(&mut runtime, fleet(&brokers, &cli.exchange, args, false)),
        Command::Modules(args) => run_on(&mut runtime, fleet(&brokers, &cli.exchange, args, true)),
    }
}

fn build(builder: &mut tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .build()
        .inspect_err(|error| eprintln!("error: failed to start the async runtime: {error}"))
        .ok()
}

fn run_on(
    builder: &mut tokio::runtime::Builder,
    command: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    match build(builder) {
        Some(runtime) => runtime.block_on(command),
        None => ExitCode::FAILURE,
    }
}

fn serve_config(brokers: Brokers, exchange: &str, args: ServeArgs) -> Result<NodeConfig, String> {
    let mut config = NodeConfig::new(brokers, args.modules);
    config.exchange = exchange.to_owned();
    if let Some(concurrency) = args.concurrency {
        config.concurrency = concurrency;
        config.prefetch = node::default_prefetch(concurrency);
    }
    if let Some(prefetch) = args.prefetch {
        config.prefetch = prefetch;
    }
    let limits = LimitOverrides {
        time: args.time_limit,
        memory: args.memory_limit,
        stack: args.stack_limit,
        request: args.request_limit,
        reply: args.reply_limit,
    };
    config.limits = limits.apply_to(&Limits::DEFAULT)?;
    config.delivery_limit = args.delivery_limit;
    // RabbitMQ takes 512 MiB at most; an error reply must always fit.
    if !(4 << 10..=512 << 20).contains(&args.max_message_size) {
        return Err("--max-message-size must be between 4KiB and 512MiB".into());
    }
    config.max_message = args.max_message_size as usize;
    config.cache_dir = match (args.no_cache, args.cache_dir) {
        (true, _) => None,
        (false, Some(dir)) => Some(dir),
        (false, None) => default_cache_dir(),
    };
    Ok(config)
}

/// `$XDG_CACHE_HOME/wasmrpc`, else `~/.cache/wasmrpc`; none without a home.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("wasmrpc"))
}

async fn fleet(brokers: &Brokers, exchange: &str, args: FleetArgs, with_modules: bool) -> ExitCode {
    let client = match Client::connect(brokers, exchange).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_BROKER);
        }
    };
    let nodes = match client.fleet(args.wait).await {
        Ok(nodes) => nodes,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_BROKER);
        }
    };
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
        eprintln!(
            "no node answered within {:.1} s on exchange {exchange:?} at {}",
            args.wait.as_secs_f64(),
            brokers
        );
        return ExitCode::from(EXIT_TIMEOUT);
    }
    ExitCode::SUCCESS
}

fn nodes_table(nodes: &[NodeStatus]) -> String {
    let rows = nodes.iter().map(|node| {
        vec![
            node.node.clone(),
            node.host.clone(),
            uptime(node.uptime_ms),
            node.modules.len().to_string(),
            format!("{}/{}", node.running, node.concurrency),
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
                "0".to_owned(),
                "0".to_owned(),
            ]
        });
        node.modules
            .iter()
            .map(|module| {
                vec![
                    module.name.clone(),
                    module.version.clone(),
                    module.calls.to_string(),
                    module.failed.to_string(),
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
            "NODE", "HOST", "UPTIME", "MODULE", "VERSION", "CALLS", "FAILED",
        ],
        rows,
    )
}

/// Left-aligned columns, two spaces apart, with a header line.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
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
fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{:02}s", s % 60),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// A node allocates and frees large buffers with every request (bodies,
/// module outputs up to the reply limit). glibc raises its mmap threshold
/// each time it frees such a buffer and serves later ones from its heap,
/// which then keeps that memory: a node's RSS would creep up with the
/// biggest outputs it has seen. A fixed threshold hands every large buffer
/// back to the kernel when it is freed.
fn return_large_buffers_to_the_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning, and runs before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    Bytes::parse(text).map(|Bytes(n)| n)
}

async fn serve(config: NodeConfig) -> anyhow::Result<()> {
    let node = Node::start(config).await?;
    node.serve(shutdown::signal_received()).await
}

async fn call(brokers: &Brokers, exchange: &str, args: CallArgs) -> ExitCode {
    let input = match read_input(args.arg.as_deref()) {
        Ok(input) => input,
        Err(error) => {
            eprintln!("error: failed to read the request body from stdin: {error}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::connect(brokers, exchange).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_BROKER);
        }
    };
    match client.call(&args.module, &input, args.timeout).await {
        Ok(reply) => match reply.error {
            None => {
                let mut stdout = std::io::stdout().lock();
                let newline = !args.raw && !reply.body.ends_with(b"\n");
                let written = stdout
                    .write_all(&reply.body)
                    .and_then(|()| {
                        if newline {
                            stdout.write_all(b"\n")
                        } else {
                            Ok(())
                        }
                    })
                    .and_then(|()| stdout.flush());
                match written {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: failed to write the reply: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
            Some(kind) => {
                eprintln!("error ({kind}): {}", String::from_utf8_lossy(&reply.body));
                ExitCode::from(EXIT_ERROR_REPLY)
            }
        },
        Err(error @ ClientError::Timeout(_)) => {
            eprintln!(
                "error: {error} from module {:?}: is a wasmrpc node running on {brokers}?",
                args.module,
            );
            ExitCode::from(EXIT_TIMEOUT)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_BROKER)
        }
    }
}

async fn bench(brokers: &Brokers, exchange: &str, args: BenchArgs) -> ExitCode {
    let client = match Client::connect(brokers, exchange).await {
        Ok(client) => std::sync::Arc::new(client),
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_BROKER);
        }
    };
    let config = BenchConfig {
        module: args.module,
        input: args.arg.unwrap_or_default().into_bytes(),
        requests: args.requests,
        duration: args.duration,
        concurrency: args.concurrency,
        expect: args.expect.map(String::into_bytes),
        timeout: args.timeout,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = match config.requests {
            Some(requests) => ProgressBar::new(requests).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} calls, {per_sec}, {eta} left")
                    .expect("a valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {elapsed} {pos} calls, {per_sec}")
                    .expect("a valid template"),
            ),
        };
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    } else {
        ProgressBar::hidden()
    };
    let report = {
        let bar = bar.clone();
        crate::bench::run(client, &config, move || bar.inc(1)).await
    };
    bar.finish_and_clear();
    let summary = if args.json {
        serde_json::to_string_pretty(&report).expect("a report is JSON")
    } else {
        report.to_string()
    };
    // A reader that went away (`| head`) is no reason to panic.
    let _ = writeln!(std::io::stdout(), "{summary}");
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR_REPLY)
    }
}

fn read_input(arg: Option<&str>) -> std::io::Result<Vec<u8>> {
    match arg {
        Some("-") => {
            let mut stdin = std::io::stdin().lock();
            if stdin.is_terminal() {
                eprintln!("reading the request body from stdin; end it with Ctrl-D");
            }
            let mut input = Vec::new();
            stdin.read_to_end(&mut input)?;
            Ok(input)
        }
        Some(arg) => Ok(arg.as_bytes().to_vec()),
        None => Ok(Vec::new()),
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

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
