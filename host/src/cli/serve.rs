//! `wasmrpc serve`: run a node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::TypedValueParser as _;

use super::common::{Failure, Global, parse_size, runtime};
use crate::children::ChildLimits;
use crate::deploy::TrustedKeys;
use crate::http;
use crate::manifest::LimitOverrides;
use crate::node::{self, Node, NodeConfig};
use crate::reply_to::Pattern;
use crate::runtime::Limits;
use crate::shutdown::Signals;
use crate::units::parse_duration;

/// Run a node: serve every `.wasm` module in a directory until SIGINT or SIGTERM.
///
/// Each `NAME.wasm` is served as module NAME; files added, replaced or
/// removed while it runs are followed. On the first signal the node stops
/// taking requests, answers those in flight and exits 0; a second signal
/// exits at once (unanswered requests return to their queues).
///
/// Example: `wasmrpc serve --modules modules --http 127.0.0.1:9090`
#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Directory of `.wasm` modules to serve.
    #[arg(long, env = "WASMRPC_MODULES", default_value = "modules")]
    modules: PathBuf,

    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` over HTTP on
    /// this address, e.g. `127.0.0.1:9090` or `0.0.0.0:9090` [default: off].
    #[arg(long, env = "WASMRPC_HTTP")]
    http: Option<SocketAddr>,

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

    #[command(flatten)]
    limits: LimitArgs,

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

    #[command(flatten)]
    cache: CacheArgs,

    #[command(flatten)]
    calls: ChildArgs,

    /// Take modules deployed with `wasmrpc deploy` when they are signed by
    /// a key listed in this file (public keys from `wasmrpc keygen`, one a
    /// line) [default: ignore deploys].
    #[arg(long, env = "WASMRPC_ACCEPT_DEPLOYS", help_heading = "Deploys")]
    accept_deploys: Option<PathBuf>,

    /// The largest module a deploy may bring.
    #[arg(long, env = "WASMRPC_DEPLOY_LIMIT", default_value = "64MiB", value_parser = parse_size, help_heading = "Deploys")]
    deploy_limit: u64,

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

    /// Answer only callers whose `reply_to` matches one of these patterns
    /// (comma-separated; `*` matches any run of characters), e.g.
    /// `amq.rabbitmq.reply-to.*,amq.gen-*`: direct reply-to and server-named
    /// queues, what RabbitMQ's tutorials and common clients use. Recommended
    /// on a broker shared by teams: a caller cannot have replies written
    /// into another team's queues. Requests whose `reply_to` does not match
    /// are acked unanswered. Replies never go to the fleet's own queues,
    /// whatever this says [default: any other name].
    #[arg(
        long,
        env = "WASMRPC_REPLY_TO",
        value_delimiter = ',',
        value_parser = parse_reply_to,
        help_heading = "Security"
    )]
    reply_to: Vec<Pattern>,
}

fn parse_reply_to(text: &str) -> Result<Pattern, String> {
    Pattern::new(text)
}

/// The limits of every module whose manifest (`NAME.toml` beside
/// `NAME.wasm`) does not set its own; shared by `serve` and `run`.
#[derive(Debug, Args)]
pub(super) struct LimitArgs {
    /// Wall-clock time a request may run, e.g. `10s`, `500ms` [default: 10s].
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
}

impl LimitArgs {
    /// The defaults with these flags applied, checked.
    pub(super) fn limits(&self) -> Result<Limits, Failure> {
        LimitOverrides {
            time: self.time_limit,
            memory: self.memory_limit,
            stack: self.stack_limit,
            request: self.request_limit,
            reply: self.reply_limit,
        }
        .apply_to(&Limits::DEFAULT)
        .map_err(|error| Failure::Usage(anyhow::anyhow!(error)))
    }
}

/// The bounds on modules' calls to other modules (`wasmrpc:compute/fleet`);
/// shared by `serve` and `run`.
#[derive(Debug, Args)]
pub(super) struct ChildArgs {
    /// How deep a chain of calls between modules may go: a module called by
    /// an outside caller is at depth 0, the modules it calls at 1. A call
    /// past it fails `too_deep`, so a module that calls itself ends.
    #[arg(long, env = "WASMRPC_MAX_CALL_DEPTH", default_value_t = DEFAULTS.max_depth, help_heading = "Calls between modules")]
    max_call_depth: u32,

    /// The most calls one `call-all` may make; more fail `too_many`.
    #[arg(long, env = "WASMRPC_MAX_FAN_OUT", default_value_t = DEFAULTS.max_calls, value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize), help_heading = "Calls between modules")]
    max_fan_out: usize,

    /// The most calls between modules in flight from this node at once;
    /// more fail `busy`.
    #[arg(long, env = "WASMRPC_MAX_CALLS_IN_FLIGHT", default_value_t = DEFAULTS.max_in_flight, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize), help_heading = "Calls between modules")]
    max_calls_in_flight: usize,

    /// The most requests that may wait for their calls at once [default:
    /// 16 × the concurrency]. Each keeps its instance (beside the 4 ×
    /// concurrency of requests in progress) but no core; past it a call
    /// fails `busy`.
    #[arg(long, env = "WASMRPC_MAX_WAITING_CALLERS", value_parser = clap::value_parser!(u32).range(1..=4096).map(|n| n as usize), help_heading = "Calls between modules")]
    max_waiting_callers: Option<usize>,

    /// The most calls one outside caller's request may cause in all: its
    /// own calls, their calls, and so on down the tree. Each call a module
    /// makes spends one and gives the called module an equal share of what
    /// is left; past it a call fails `too_many`.
    #[arg(long, env = "WASMRPC_MAX_CALLS_PER_REQUEST", default_value_t = DEFAULTS.max_tree_calls, value_parser = clap::value_parser!(u64).range(1..=1_000_000), help_heading = "Calls between modules")]
    max_calls_per_request: u64,

    /// The most memory the waiting requests may hold in all (their
    /// instances' memory, their calls' inputs, and the replies as they
    /// arrive); past it a call fails `busy`.
    #[arg(long, env = "WASMRPC_WAITING_MEMORY", default_value = "2GiB", value_parser = parse_size, help_heading = "Calls between modules")]
    waiting_memory: u64,
}

impl ChildArgs {
    /// The bounds, for a node whose `concurrency` guests compute at once.
    pub(super) fn limits(&self, concurrency: u32) -> ChildLimits {
        ChildLimits {
            max_depth: self.max_call_depth,
            max_calls: self.max_fan_out,
            max_in_flight: self.max_calls_in_flight,
            max_waiting: self
                .max_waiting_callers
                .unwrap_or(ChildLimits::for_concurrency(concurrency).max_waiting),
            waiting_memory: self.waiting_memory,
            max_tree_calls: self.max_calls_per_request,
        }
    }
}

/// The defaults of the flags that do not depend on the concurrency.
const DEFAULTS: ChildLimits = ChildLimits::for_concurrency(1);

/// Where compiled modules are kept between runs.
#[derive(Debug, Args)]
pub(super) struct CacheArgs {
    /// Where compiled modules are cached between runs, so a restarted node
    /// skips the compiler [default: $XDG_CACHE_HOME/wasmrpc, else
    /// ~/.cache/wasmrpc].
    #[arg(long, env = "WASMRPC_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// The most the cache may hold, e.g. `512MiB`; past it, the entries used
    /// least recently are deleted.
    #[arg(long, env = "WASMRPC_CACHE_SIZE", default_value = "1GiB", value_parser = parse_size)]
    cache_size: u64,

    /// Compile every module at every start; keep nothing on disk.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
}

impl CacheArgs {
    /// The cache directory and its size cap, or `None` for no cache.
    pub(super) fn cache(&self) -> Option<(PathBuf, u64)> {
        let dir = match (self.no_cache, &self.cache_dir) {
            (true, _) => None,
            (false, Some(dir)) => Some(dir.clone()),
            (false, None) => default_cache_dir(),
        };
        dir.map(|dir| (dir, self.cache_size))
    }
}

/// `$XDG_CACHE_HOME/wasmrpc`, else `~/.cache/wasmrpc`; none without a home.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("wasmrpc"))
}

pub(super) fn run(args: ServeArgs, global: &Global) -> Result<(), Failure> {
    return_large_buffers_to_the_kernel();
    survive_the_file_size_limit();
    let http = args.http;
    let config = config(args, global)?;
    let dir = &config.modules_dir;
    if !dir.is_dir() {
        let shown = dir.display();
        return Err(Failure::Usage(anyhow::anyhow!(if dir.exists() {
            format!("the modules directory {shown} is not a directory: give one with --modules")
        } else {
            format!(
                "the modules directory {shown} does not exist: create it (`mkdir -p {shown}`) \
                 for a node that serves nothing yet, or give another with --modules (WASMRPC_MODULES)"
            )
        })));
    }
    // Guests compute on at most `concurrency` workers; one more keeps the
    // broker connections flowing whatever the guests do.
    let runtime = runtime(Some(config.concurrency as usize + 1))?;
    let served = runtime.block_on(async {
        // Bound before anything else, so a taken port fails the start at once.
        let listener = match http {
            Some(addr) => Some(http::bind(addr).await.map_err(Failure::Failed)?),
            None => None,
        };
        let node = Node::start(config).await.map_err(|error| {
            tracing::error!("{error:#}");
            Failure::Failed(error)
        })?;
        // The endpoint outlives the node's serving, so that `/readyz` says
        // 503 for as long as the node drains.
        let endpoint = listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz over HTTP");
            }
            tokio::spawn(http::serve(listener, node.probe(), std::future::pending()))
        });
        let signals = Signals::listen();
        let served = tokio::select! {
            served = node.serve(signals.clone().first()) => served.map_err(|error| {
                tracing::error!("{error:#}");
                Failure::Failed(error)
            }),
            () = signals.second() => Err(Failure::Interrupted),
        };
        if let Some(endpoint) = endpoint {
            endpoint.abort();
        }
        served
    });
    // Whatever still runs (a drain cut short, a compile) is not waited for.
    runtime.shutdown_background();
    served
}

fn config(args: ServeArgs, global: &Global) -> Result<NodeConfig, Failure> {
    let mut config = NodeConfig::new(global.brokers()?, args.modules);
    config.exchange = global.exchange.clone();
    if let Some(concurrency) = args.concurrency {
        config.concurrency = concurrency;
        config.prefetch = node::default_prefetch(concurrency);
    }
    if let Some(prefetch) = args.prefetch {
        config.prefetch = prefetch;
    }
    config.limits = args.limits.limits()?;
    config.delivery_limit = args.delivery_limit;
    config.children = args.calls.limits(config.concurrency);
    // RabbitMQ takes 512 MiB at most; an error reply must always fit.
    if !(4 << 10..=512 << 20).contains(&args.max_message_size) {
        return Err(Failure::Usage(anyhow::anyhow!(
            "--max-message-size must be between 4KiB and 512MiB"
        )));
    }
    config.max_message = args.max_message_size as usize;
    config.reply_to = args.reply_to.clone();
    if let Some(path) = &args.accept_deploys {
        config.accept_deploys = Some(TrustedKeys::read(path).map_err(Failure::Usage)?);
    }
    config.deploy_limit = usize::try_from(args.deploy_limit).unwrap_or(usize::MAX);
    (config.cache_dir, config.cache_size) = match args.cache.cache() {
        Some((dir, size)) => (Some(dir), size),
        None => (None, config.cache_size),
    };
    Ok(config)
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

/// A write past the process's file size limit (`ulimit -f`) ends the process
/// with SIGXFSZ unless that signal is ignored; ignored, the write fails with
/// "File too large", and the node refuses that deploy, or keeps that module
/// out of its cache, and serves on.
fn survive_the_file_size_limit() {
    // SAFETY: ignoring a signal changes no memory; it runs before any other
    // thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
