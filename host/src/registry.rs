//! The modules a node serves, by name.
//!
//! Loading compiles each file once, off the async path; serving looks a module
//! up and holds its `Arc` for the length of one request, so the set can change
//! while requests run: a request keeps the version it started with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;
use crate::names::ModuleName;
use crate::runtime::{Limits, Module, Runtime};

/// A module ready to serve requests.
pub struct LoadedModule {
    pub name: ModuleName,
    /// The compiled code and the limits its requests run within.
    pub module: Module,
    /// The first 16 hex digits of the SHA-256 of the file: which build this is.
    pub version: String,
    pub path: PathBuf,
}

/// The set of modules a node serves; cheap to read from many requests at once.
#[derive(Default)]
pub struct Registry {
    modules: RwLock<BTreeMap<ModuleName, Arc<LoadedModule>>>,
}

impl Registry {
    pub fn get(&self, name: &ModuleName) -> Option<Arc<LoadedModule>> {
        self.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<ModuleName> {
        self.read().keys().cloned().collect()
    }

    /// Adds a module, or replaces the one with the same name. Returns the
    /// replaced one.
    pub fn insert(&self, module: LoadedModule) -> Option<Arc<LoadedModule>> {
        let mut modules = self.modules.write().expect("registry lock");
        modules.insert(module.name.clone(), Arc::new(module))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ModuleName, Arc<LoadedModule>>> {
        self.modules.read().expect("registry lock")
    }
}

/// Compiles every `*.wasm` file in `dir`, in name order, each with `limits`
/// unless its manifest changes them. A file that cannot be served (bad name,
/// bad manifest, not wasm, wrong world) is skipped with a warning so one bad
/// file never keeps the others from serving; only an unreadable directory is
/// an error.
pub async fn load_dir(
    runtime: &Runtime,
    dir: &Path,
    limits: &Limits,
) -> anyhow::Result<Vec<LoadedModule>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("failed to read the modules directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    paths.sort();

    let mut loaded = Vec::with_capacity(paths.len());
    for path in paths {
        match load_file(runtime, &path, limits).await {
            Ok(module) => {
                let limits = module.module.limits();
                tracing::info!(
                    module = %module.name,
                    version = %module.version,
                    path = %path.display(),
                    time_limit = %crate::units::display_millis(limits.time),
                    memory_limit = %crate::units::Bytes(limits.memory),
                    "loaded module"
                );
                loaded.push(module);
            }
            Err(error) => tracing::warn!(path = %path.display(), "skipping module: {error:#}"),
        }
    }
    Ok(loaded)
}

/// Reads, hashes and compiles one module file, with the limits of its
/// manifest if it has one and `limits` otherwise.
pub async fn load_file(
    runtime: &Runtime,
    path: &Path,
    limits: &Limits,
) -> anyhow::Result<LoadedModule> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default();
    let name: ModuleName = stem.parse()?;
    let limits = match Manifest::beside(path)? {
        Some(manifest) => manifest.limits.apply_to(limits).map_err(|error| {
            anyhow::anyhow!(
                "invalid manifest {}: {error}",
                path.with_extension("toml").display()
            )
        })?,
        None => limits.clone(),
    };
    let wasm = tokio::fs::read(path)
        .await
        .with_context(|| format!("failed to read {}", path.display()))?;
    let version = version_of(&wasm);
    let runtime = runtime.clone();
    let started = Instant::now();
    let module = tokio::task::spawn_blocking(move || runtime.compile(&wasm, &limits))
        .await
        .context("the compiler thread panicked")?
        .with_context(|| format!("module {name} cannot be served"))?;
    tracing::debug!(module = %name, elapsed_ms = started.elapsed().as_millis(), "compiled module");
    Ok(LoadedModule {
        name,
        module,
        version,
        path: path.to_owned(),
    })
}

/// The content hash that identifies one build of a module.
pub fn version_of(wasm: &[u8]) -> String {
    let digest = Sha256::digest(wasm);
    digest[..8]
        .iter()
        .fold(String::with_capacity(16), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}
