//! `wasmrpc run`: run a module once, here, without a broker.

use std::path::PathBuf;

use clap::Args;

use super::common::{Failure, print_body, read_input};
use super::serve::{CacheArgs, LimitArgs};
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
/// Exit codes: 0 the module answered, 1 it failed (the error kind as a node
/// would reply it), 2 bad usage (a file that is missing or not a module).
///
/// Examples: `wasmrpc run modules/fib.wasm 30`; `echo 30 | wasmrpc run fib.wasm -`
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

    #[command(flatten)]
    cache: CacheArgs,
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
    let mut config = RuntimeConfig::new(1, None);
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
    match module.module.call(&input, None).await {
        Ok(output) => print_body(&output, args.raw),
        Err(error) => Err(Failure::Reply {
            kind: ErrorKind::from(&error).to_string(),
            message: format!("{name}: {error}"),
        }),
    }
}
