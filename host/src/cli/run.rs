//! `wasmrpc run`: run a module once, here, without a broker.

use std::path::PathBuf;

use clap::Args;

use super::common::{Failure, print_body, read_input};
use super::serve::{CacheArgs, ChildArgs, LimitArgs};
use crate::local::LocalFleet;
use crate::names::ModuleName;
use crate::registry;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::wire::ErrorKind;

/// Run a module once, locally, with no broker, and print its output.
///
/// The module runs as a node would run it: in a fresh sandbox, with the
/// manifest beside the file (`NAME.toml`) and the same limit flags as
/// `serve`. Its output goes to stdout; an error prints its kind and message
/// to stderr, as `call` does.
///
/// A module that calls other modules (`wasmrpc:compute/fleet`) calls the
/// modules of `--modules` here, in this process, with the limits and errors
/// a node would give it.
///
/// Exit codes: 0 the module answered, 1 it failed (the error kind as a node
/// would reply it), 2 bad usage (a file that is missing or not a module).
///
/// Examples: `wasmrpc run modules/fib.wasm 30`; `echo 30 | wasmrpc run fib.wasm -`;
/// `wasmrpc run sumfib.wasm --modules modules 1..30`
#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// The module file, e.g. `modules/fib.wasm`.
    file: PathBuf,

    /// The request body, e.g. `30`. `-` reads it from stdin; omitted, the body is empty.
    #[arg(allow_hyphen_values = true)]
    arg: Option<String>,

    /// Print the output exactly, without adding a final newline.
    #[arg(long)]
    raw: bool,

    #[command(flatten)]
    limits: LimitArgs,

    /// Where the modules it calls are (`NAME.wasm`, with `NAME.toml`)
    /// [default: the directory of FILE].
    #[arg(long, env = "WASMRPC_MODULES")]
    modules: Option<PathBuf>,

    #[command(flatten)]
    cache: CacheArgs,

    #[command(flatten)]
    calls: ChildArgs,
}

pub(super) async fn run(args: RunArgs) -> Result<(), Failure> {
    let limits = args.limits.limits()?;
    let input = read_input(args.arg.as_deref())?;
    let stem = args
        .file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default();
    let name: ModuleName = stem
        .parse()
        .map_err(|invalid| Failure::Usage(anyhow::anyhow!("{}: {invalid}", args.file.display())))?;
    let concurrency = crate::node::default_concurrency();
    let bounds = args.calls.limits(concurrency);
    // Every request of a chain of calls is alive at once, here.
    let mut config = RuntimeConfig::new(concurrency, None).keeping_waiting(bounds.max_waiting);
    if let Some((dir, size)) = args.cache.cache() {
        config.cache_dir = Some(dir);
        config.cache_size = size;
    }
    let runtime = Runtime::new(&config).map_err(Failure::Failed)?;
    // No broker stands between: nothing lowers the reply limit below the module's.
    let module = registry::load_file(&runtime, &name, &args.file, &limits, usize::MAX, None)
        .await
        .map_err(|error| {
            Failure::Usage(error.context(format!("{} cannot be run", args.file.display())))
        })?
        .expect("a first load always loads");
    let calling = module.module.imports_fleet().then(|| {
        let dir = args.modules.clone().unwrap_or_else(|| {
            args.file
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), ToOwned::to_owned)
        });
        let deadline = std::time::Instant::now() + module.module.limits().time;
        LocalFleet::new(runtime.clone(), dir, limits.clone(), bounds).calling(&module, deadline, 0)
    });
    match module.module.call_with(&input, None, calling).await {
        Ok(output) => print_body(&output, args.raw),
        Err(error) => Err(Failure::Reply {
            kind: ErrorKind::from(&error).to_string(),
            message: format!("{name}: {error}"),
        }),
    }
}
