//! The modules a node serves, by name, and how they get there from files.
//!
//! A request takes the `Arc` of its module when it arrives and holds it to
//! the end, so the set can change under running requests: they finish on the
//! version they started with, and new requests get the new one. Only the
//! [`Loader`] changes the set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::Context as _;

use crate::manifest::Manifest;
use crate::names::ModuleName;
use crate::runtime::{Limits, Module, Runtime, Wasm};
use crate::units::{Bytes, display_millis};
use crate::watch::module_stem;
use crate::wire::DEFAULT_CONTENT_TYPE;

/// A module ready to serve requests.
pub struct LoadedModule {
    pub name: ModuleName,
    /// The compiled code and the limits its requests run within.
    pub module: Module,
    /// The first 16 hex digits of the SHA-256 of the file: which build this
    /// is. Replies carry it.
    pub version: String,
    pub path: PathBuf,
    /// The `content_type` of its successful replies.
    pub content_type: String,
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

    /// Every module, in name order.
    pub fn all(&self) -> Vec<Arc<LoadedModule>> {
        self.read().values().cloned().collect()
    }

    fn insert(&self, module: LoadedModule) -> (Arc<LoadedModule>, Option<Arc<LoadedModule>>) {
        let module = Arc::new(module);
        let mut modules = self.modules.write().expect("registry lock");
        let replaced = modules.insert(module.name.clone(), module.clone());
        (module, replaced)
    }

    fn remove(&self, name: &ModuleName) -> Option<Arc<LoadedModule>> {
        self.modules.write().expect("registry lock").remove(name)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ModuleName, Arc<LoadedModule>>> {
        self.modules.read().expect("registry lock")
    }
}

/// What looking at a module's files again changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// A module that was not served is now.
    Added(ModuleName),
    /// A served module has a new version (or new limits).
    Replaced(ModuleName),
    /// A served module's file is gone.
    Removed(ModuleName),
}

/// Brings the registry in line with the files of the modules directory.
pub struct Loader {
    runtime: Runtime,
    dir: PathBuf,
    limits: Limits,
    /// No module's reply limit is above it: the broker refuses larger messages.
    max_reply: usize,
    registry: Arc<Registry>,
    /// Held while a module's files are read: whoever changes several files
    /// at once (a deploy) holds it too, so they are read together.
    directory: Arc<tokio::sync::Mutex<()>>,
}

impl Loader {
    /// A loader of the modules in `dir` into `registry`, each with `limits`
    /// unless its manifest changes them, and none with a reply limit above
    /// `max_reply`.
    pub fn new(
        runtime: Runtime,
        dir: &Path,
        limits: Limits,
        max_reply: usize,
        registry: Arc<Registry>,
    ) -> Loader {
        Loader {
            runtime,
            dir: dir.to_owned(),
            limits,
            max_reply,
            registry,
            directory: Arc::default(),
        }
    }

    /// The lock held while a module's files are read: hold it to change
    /// several of them as one.
    pub fn directory(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.directory.clone()
    }

    /// Loads every module in the directory, several at a time. A file that
    /// cannot be served is skipped with a warning, so one bad file never
    /// keeps the others from serving; only an unreadable directory is an
    /// error.
    pub async fn load_all(self: &Arc<Self>) -> anyhow::Result<()> {
        let started = Instant::now();
        let stems = self.stems_on_disk()?;
        let mut loading = tokio::task::JoinSet::new();
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        for stem in stems {
            if loading.len() >= parallel {
                loading.join_next().await;
            }
            let loader = self.clone();
            loading.spawn(async move { loader.reconcile(&stem).await });
        }
        while loading.join_next().await.is_some() {}
        tracing::info!(
            modules = self.registry.names().len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded the modules directory"
        );
        Ok(())
    }

    /// Looks at every module again: those on disk and those served.
    pub async fn reconcile_all(&self) -> Vec<Update> {
        let mut stems: BTreeSet<String> = match self.stems_on_disk() {
            Ok(stems) => stems,
            Err(error) => {
                tracing::error!("{error:#}");
                BTreeSet::new()
            }
        };
        stems.extend(self.registry.names().iter().map(|name| name.to_string()));
        let mut updates = Vec::new();
        for stem in stems {
            updates.extend(self.reconcile(&stem).await);
        }
        updates
    }

    /// Looks at the files of the module `stem` and updates the registry to
    /// match: loads a new or changed module, drops one whose file is gone.
    /// A file that cannot be served is refused with a warning; the version
    /// already served, if any, keeps serving.
    pub async fn reconcile(&self, stem: &str) -> Option<Update> {
        let path = self.dir.join(format!("{stem}.wasm"));
        let name = match stem.parse::<ModuleName>() {
            Ok(name) => name,
            Err(invalid) => {
                if path.exists() {
                    tracing::warn!(path = %path.display(), "refusing module: {invalid}");
                }
                return None;
            }
        };
        let current = self.registry.get(&name);
        if !path.exists() {
            let removed = self.registry.remove(&name)?;
            tracing::info!(module = %name, version = %removed.version, "module file removed: no longer serving it");
            return Some(Update::Removed(name));
        }
        let started = Instant::now();
        match self.load(&name, &path, current.as_deref()).await {
            Ok(None) => None,
            Ok(Some(module)) => {
                let limits = module.module.limits().clone();
                let from_cache = module.module.from_cache();
                let (module, replaced) = self.registry.insert(module);
                tracing::info!(
                    module = %name,
                    version = %module.version,
                    kind = %module.module.kind(),
                    replaced = replaced.as_ref().map(|old| tracing::field::display(&old.version)),
                    from_cache,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    time_limit = %display_millis(limits.time),
                    memory_limit = %Bytes(limits.memory),
                    "loaded module"
                );
                Some(match replaced {
                    Some(_) => Update::Replaced(name),
                    None => Update::Added(name),
                })
            }
            Err(error) => {
                match current {
                    Some(current) => tracing::warn!(
                        module = %name,
                        path = %path.display(),
                        "refusing the new version, version {} keeps serving: {error:#}",
                        current.version
                    ),
                    None => tracing::warn!(path = %path.display(), "skipping module: {error:#}"),
                }
                None
            }
        }
    }

    /// Reads, hashes and compiles one module, with the limits of its manifest
    /// if it has one. `None` if `current` is the very same build and limits.
    async fn load(
        &self,
        name: &ModuleName,
        path: &Path,
        current: Option<&LoadedModule>,
    ) -> anyhow::Result<Option<LoadedModule>> {
        let files = {
            let _reading = self.directory.lock().await;
            ModuleFiles::read(path).await?
        };
        prepare(
            &self.runtime,
            name,
            path,
            files,
            &self.limits,
            self.max_reply,
            current,
        )
        .await
    }

    fn stems_on_disk(&self) -> anyhow::Result<BTreeSet<String>> {
        let entries = std::fs::read_dir(&self.dir).with_context(|| {
            format!(
                "failed to read the modules directory {}",
                self.dir.display()
            )
        })?;
        Ok(entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "wasm"))
            .filter_map(|entry| module_stem(&entry.path()))
            .collect())
    }
}

/// A module's files, read together: its bytes and its manifest.
pub struct ModuleFiles {
    manifest: Manifest,
    bytes: Vec<u8>,
}

impl ModuleFiles {
    /// Reads the module at `path` and the manifest beside it, if any.
    pub async fn read(path: &Path) -> anyhow::Result<ModuleFiles> {
        let manifest = Manifest::beside(path)?.unwrap_or_default();
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("failed to read {}", path.display()))?;
        Ok(ModuleFiles { manifest, bytes })
    }
}

/// Reads, hashes and compiles the module at `path` as `name`, with `limits`
/// changed by its manifest if it has one, and no reply limit above
/// `max_reply`. `None` if `current` is the very same build, limits and
/// content type.
pub async fn load_file(
    runtime: &Runtime,
    name: &ModuleName,
    path: &Path,
    limits: &Limits,
    max_reply: usize,
    current: Option<&LoadedModule>,
) -> anyhow::Result<Option<LoadedModule>> {
    let files = ModuleFiles::read(path).await?;
    prepare(runtime, name, path, files, limits, max_reply, current).await
}

/// Compiles a module read from `path`; see [`load_file`].
async fn prepare(
    runtime: &Runtime,
    name: &ModuleName,
    path: &Path,
    files: ModuleFiles,
    limits: &Limits,
    max_reply: usize,
    current: Option<&LoadedModule>,
) -> anyhow::Result<Option<LoadedModule>> {
    let ModuleFiles { manifest, bytes } = files;
    let limits = limits_of(&manifest, limits, max_reply, name).map_err(|error| {
        anyhow::anyhow!(
            "invalid manifest {}: {error}",
            path.with_extension("toml").display()
        )
    })?;
    let content_type = manifest
        .content_type
        .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned());
    let wasm = Wasm::new(bytes);
    if let Some(current) = current
        && current.module.digest() == wasm.digest()
        && *current.module.limits() == limits
        && current.content_type == content_type
    {
        return Ok(None);
    }
    let runtime = runtime.clone();
    let module = tokio::task::spawn_blocking(move || runtime.compile(&wasm, &limits))
        .await
        .context("the compiler thread panicked")?
        .with_context(|| format!("module {name} cannot be served"))?;
    Ok(Some(LoadedModule {
        name: name.clone(),
        version: module.digest()[..16].to_owned(),
        module,
        path: path.to_owned(),
        content_type,
    }))
}

/// The limits a module serves within: `base` (the node's) changed by its
/// manifest, checked, and with no reply limit above `max_reply` (what the
/// broker accepts; a higher one is lowered, with a warning).
pub fn limits_of(
    manifest: &Manifest,
    base: &Limits,
    max_reply: usize,
    name: &ModuleName,
) -> Result<Limits, String> {
    let mut limits = manifest.limits.apply_to(base)?;
    if limits.reply > max_reply {
        tracing::warn!(
            module = %name,
            "its manifest sets a reply limit of {}, more than the broker accepts: using {}",
            Bytes(limits.reply as u64),
            Bytes(max_reply as u64)
        );
        limits.reply = max_reply;
    }
    Ok(limits)
}
