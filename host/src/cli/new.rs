//! `wasmrpc new`: a guest project to start a module from.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::common::Failure;
use crate::names::ModuleName;

/// Start a module: make a guest project that builds into `modules/NAME.wasm`.
///
/// The project holds the module's source (it answers `hello, BODY`), the
/// world it implements (`wit/wasmrpc.wit`) and a `build` script: run it, and
/// `NAME.wasm` lands in the modules directory (the one given here, or
/// `$WASMRPC_MODULES` when it runs), where a running node picks it up.
/// Rust needs the wasm32-wasip2 target, Python componentize-py, JavaScript
/// Node.js (the first build installs componentize-js), C clang and
/// wasi-libc.
///
/// With `--fleet` (Rust), the module calls other modules instead: for each
/// word of the body it calls `fib`, and its manifest (`NAME.toml`, which the
/// build puts beside it) lets it call `fib` and nothing else.
///
/// Example: `wasmrpc new greet --lang python && ./greet/build && wasmrpc call greet world`
#[derive(Debug, Args)]
pub(super) struct NewArgs {
    /// The module's name: 1 to 64 of a-z, 0-9, `-` and `_`.
    name: String,

    /// The language to write it in.
    #[arg(long, value_enum)]
    lang: Lang,

    /// Where to make the project [default: ./NAME].
    #[arg(long)]
    dir: Option<PathBuf>,

    /// The modules directory its build writes to.
    #[arg(long, env = "WASMRPC_MODULES", default_value = "modules")]
    modules: PathBuf,

    /// A module that calls other modules (the `fleet-module` world), with
    /// a manifest that says which. Rust only.
    #[arg(long)]
    fleet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Lang {
    Rust,
    Python,
    Js,
    C,
}

/// The world every project gets a copy of.
const WIT: &str = include_str!("../../../wit/wasmrpc.wit");

impl Lang {
    /// Each file of the project: its path and its template.
    fn files(self, fleet: bool) -> Result<&'static [(&'static str, &'static str)], String> {
        macro_rules! template {
            ($path:literal) => {
                include_str!(concat!("../../templates/", $path))
            };
        }
        Ok(match (self, fleet) {
            (Lang::Rust, true) => &[
                ("Cargo.toml", template!("rust/Cargo.toml")),
                ("src/lib.rs", template!("rust-fleet/src/lib.rs")),
                ("build", template!("rust-fleet/build")),
                ("{{name}}.toml", template!("rust-fleet/manifest.toml")),
            ],
            (_, true) => return Err("--fleet makes Rust projects only (--lang rust)".into()),
            (Lang::Rust, false) => &[
                ("Cargo.toml", template!("rust/Cargo.toml")),
                ("src/lib.rs", template!("rust/src/lib.rs")),
                ("build", template!("rust/build")),
            ],
            (Lang::Python, false) => &[
                ("app.py", template!("python/app.py")),
                ("build", template!("python/build")),
            ],
            (Lang::Js, false) => &[
                ("app.js", template!("js/app.js")),
                ("package.json", template!("js/package.json")),
                ("build", template!("js/build")),
            ],
            (Lang::C, false) => &[
                ("main.c", template!("c/main.c")),
                ("build", template!("c/build")),
            ],
        })
    }
}

pub(super) fn run(args: NewArgs) -> Result<(), Failure> {
    let usage = |error: String| Failure::Usage(anyhow::anyhow!(error));
    let name: ModuleName = args
        .name
        .parse()
        .map_err(|invalid| usage(format!("{invalid}")))?;
    let templates = args.lang.files(args.fleet).map_err(usage)?;
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(name.as_str()));
    if dir.exists()
        && dir
            .read_dir()
            .map_or(true, |mut entries| entries.next().is_some())
    {
        return Err(usage(format!(
            "{} already exists and is not empty",
            dir.display()
        )));
    }
    let modules = std::path::absolute(&args.modules).map_err(|error| {
        usage(format!(
            "the modules directory {}: {error}",
            args.modules.display()
        ))
    })?;
    let fill = |template: &str| {
        template
            .replace("{{name}}", name.as_str())
            // Cargo names a cdylib after its package, with `_` for `-`.
            .replace("{{crate}}", &name.as_str().replace('-', "_"))
            .replace("{{modules}}", &modules.display().to_string())
    };
    let files = templates
        .iter()
        .map(|(path, template)| (fill(path), fill(template)));
    for (path, contents) in files.chain([("wit/wasmrpc.wit".to_owned(), WIT.to_owned())]) {
        write(&dir.join(path), &contents).map_err(Failure::Failed)?;
    }
    println!(
        "made {}: run {} to build {}",
        dir.display(),
        dir.join("build").display(),
        modules.join(format!("{name}.wasm")).display()
    );
    Ok(())
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    std::fs::write(path, contents)
        .with_context(|| format!("failed to write {}", path.display()))?;
    if path.file_name().is_some_and(|name| name == "build") {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("failed to make {} executable", path.display()))?;
    }
    Ok(())
}
