//! The modules a node serves, by name, and how they get there from files.
//!
//! A request takes the `Arc` of its module when it arrives and holds it to
//! the end, so the set can change under running requests: they finish on the
//! version they started with, and new requests get the new one. Only the
//! [`Loader`] changes the set, and it says what it changes, including what
//! it is about to: a module being compiled for the first time is `Loading`
//! (its requests should wait for it), and one whose file cannot be served
//! `Failed`, with why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::manifest::Manifest;
use crate::names::ModuleName;
use crate::runtime::{Callees, Limits, Module, Runtime, Wasm};
use crate::stats::Stats;
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
    /// The modules it may call, from its manifest.
    pub calls: Callees,
}

/// The set of modules a node serves; cheap to read from many requests at once.
#[derive(Default)]
pub struct Registry {
    modules: RwLock<BTreeMap<ModuleName, Arc<LoadedModule>>>,
    /// Counts the changes, so that one can be awaited.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// The number of changes made so far, kept up to date: await a change
    /// with `wait_for` instead of polling.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

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
        drop(modules);
        self.changes.send_modify(|changes| *changes += 1);
        (module, replaced)
    }

    fn remove(&self, name: &ModuleName) -> Option<Arc<LoadedModule>> {
        let removed = self.modules.write().expect("registry lock").remove(name);
        self.changes.send_modify(|changes| *changes += 1);
        removed
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ModuleName, Arc<LoadedModule>>> {
        self.modules.read().expect("registry lock")
    }
}

/// What the loader changed, or is changing, for the node to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// A module that is not served has a file, and is being compiled: its
    /// requests should wait for it rather than be answered `not_found`.
    Loading(ModuleName),
    /// A module that was not served is now.
    Added(ModuleName),
    /// A served module has a new version (or new limits).
    Replaced(ModuleName),
    /// A served module's file is gone.
    Removed(ModuleName),
    /// A module that is not served has a file that cannot be served; why.
    Failed(ModuleName, String),
    /// A deploy of a module that is not served was refused, why: nothing is
    /// left of it, and the requests that waited for it are answered so.
    Refused(ModuleName, String),
}

/// Brings the registry in line with the files of the modules directory,
/// and tells whoever follows it what it changes.
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
    /// Where each change goes; nowhere for a loader nobody follows.
    updates: Option<mpsc::UnboundedSender<Update>>,
    /// The modules not served whose files are being compiled.
    loading: Mutex<BTreeSet<ModuleName>>,
    /// The modules not served whose files could not be: why, and which
    /// files those were (the same files are not tried again).
    failed: Mutex<BTreeMap<ModuleName, (String, Option<FilesStamp>)>>,
    /// One change to a module at a time: a deploy's install and the
    /// watcher's look at the same module do not interleave.
    changing: Mutex<BTreeMap<ModuleName, Arc<tokio::sync::Mutex<()>>>>,
    /// Where refusals are counted, if anywhere.
    stats: Option<Arc<Stats>>,
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
            updates: None,
            loading: Mutex::default(),
            failed: Mutex::default(),
            changing: Mutex::default(),
            stats: None,
        }
    }

    /// This loader, counting the files it refuses in `stats`.
    pub fn counting_in(mut self, stats: Arc<Stats>) -> Loader {
        self.stats = Some(stats);
        self
    }

    /// This loader, telling `updates` each change it makes.
    pub fn reporting_to(mut self, updates: mpsc::UnboundedSender<Update>) -> Loader {
        self.updates = Some(updates);
        self
    }

    /// The modules not served yet whose files are being compiled.
    pub fn loading(&self) -> Vec<ModuleName> {
        self.loading
            .lock()
            .expect("loader lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Whether the module `name`, not served yet, is being compiled.
    pub fn is_loading(&self, name: &ModuleName) -> bool {
        self.loading.lock().expect("loader lock").contains(name)
    }

    /// Why the module `name`, which has a file, is not served, if it failed
    /// to load.
    pub fn failure(&self, name: &ModuleName) -> Option<String> {
        let failed = self.failed.lock().expect("loader lock");
        failed.get(name).map(|(why, _)| why.clone())
    }

    /// Every module that failed to load, with why.
    pub fn failures(&self) -> Vec<(ModuleName, String)> {
        let failed = self.failed.lock().expect("loader lock");
        failed
            .iter()
            .map(|(name, (why, _))| (name.clone(), why.clone()))
            .collect()
    }

    /// The right to change module `name`, alone.
    async fn change(&self, name: &ModuleName) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .changing
            .lock()
            .expect("loader lock")
            .entry(name.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Says, before anything is compiled, that the module `stem` has a new
    /// file and is not served: its queue is bound at once, so that requests
    /// sent from now on wait for it however many modules compile first.
    /// `reconcile` then loads it.
    pub fn announce(&self, stem: &str) {
        let Ok(name) = stem.parse::<ModuleName>() else {
            return;
        };
        let path = self.dir.join(format!("{stem}.wasm"));
        if self.registry.get(&name).is_some() || !path.exists() {
            return;
        }
        if self.failed_already(&name, &FilesStamp::of(&path)) {
            return;
        }
        self.start_loading(&name);
    }

    /// A deploy of `name` compiles: unless the module is served, its
    /// requests wait for it, as for a file being loaded, until
    /// [`Loader::deployed`].
    pub fn deploying(&self, name: &ModuleName) {
        if self.registry.get(name).is_none() {
            self.start_loading(name);
        }
    }

    /// The deploy of `name` is over: written and served, or refused for
    /// `refused`, which the requests that waited for it hear.
    pub fn deployed(&self, name: &ModuleName, refused: Option<&str>) {
        let was_loading = self.loading.lock().expect("loader lock").remove(name);
        if let Some(why) = refused
            && was_loading
            && self.registry.get(name).is_none()
        {
            self.report(Update::Refused(name.clone(), why.to_owned()));
        }
    }

    fn start_loading(&self, name: &ModuleName) {
        if self
            .loading
            .lock()
            .expect("loader lock")
            .insert(name.clone())
        {
            self.report(Update::Loading(name.clone()));
        }
    }

    /// Whether these very files of `name` failed to load already.
    fn failed_already(&self, name: &ModuleName, stamp: &Option<FilesStamp>) -> bool {
        let failed = self.failed.lock().expect("loader lock");
        matches!(failed.get(name), Some((_, Some(failed))) if stamp.as_ref() == Some(failed))
    }

    fn report(&self, update: Update) {
        if let Some(updates) = &self.updates {
            let _ = updates.send(update);
        }
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
    pub async fn reconcile_all(&self) {
        let mut stems: BTreeSet<String> = match self.stems_on_disk() {
            Ok(stems) => stems,
            Err(error) => {
                tracing::error!("{error:#}");
                BTreeSet::new()
            }
        };
        stems.extend(self.registry.names().iter().map(|name| name.to_string()));
        for stem in stems {
            self.reconcile(&stem).await;
        }
    }

    /// Looks at the files of the module `stem` and updates the registry to
    /// match: loads a new or changed module, drops one whose file is gone.
    /// A file that cannot be served is refused with a warning; the version
    /// already served, if any, keeps serving. Reports what it does.
    pub async fn reconcile(&self, stem: &str) {
        let path = self.dir.join(format!("{stem}.wasm"));
        let name = match stem.parse::<ModuleName>() {
            Ok(name) => name,
            Err(invalid) => {
                if path.exists() {
                    tracing::warn!(path = %path.display(), "refusing module: {invalid}");
                }
                return;
            }
        };
        let _changing = self.change(&name).await;
        let current = self.registry.get(&name);
        if !path.exists() {
            let failed = self.failed.lock().expect("loader lock").remove(&name);
            if let Some(removed) = self.registry.remove(&name) {
                tracing::info!(module = %name, version = %removed.version, "module file removed: no longer serving it");
                self.report(Update::Removed(name));
            } else if failed.is_some() {
                // Nothing left to stand in for.
                self.report(Update::Removed(name));
            }
            return;
        }
        let stamp = FilesStamp::of(&path);
        if current.is_none() {
            if self.failed_already(&name, &stamp) {
                // The very files that failed already (the watcher may tell
                // of one change twice).
                self.loading.lock().expect("loader lock").remove(&name);
                return;
            }
            self.start_loading(&name);
        }
        let started = Instant::now();
        let loaded = self.load(&name, &path, current.as_deref()).await;
        self.loading.lock().expect("loader lock").remove(&name);
        if loaded.is_err()
            && let Some(stats) = &self.stats
        {
            stats.refused_load();
        }
        match loaded {
            Ok(None) => {}
            Ok(Some(module)) => self.insert(module, started),
            Err(error) => match current {
                Some(current) => tracing::warn!(
                    module = %name,
                    path = %path.display(),
                    "refusing the new version, version {} keeps serving: {error:#}",
                    current.version
                ),
                None => {
                    tracing::warn!(path = %path.display(), "skipping module: {error:#}");
                    let why = format!("{error:#}");
                    self.failed
                        .lock()
                        .expect("loader lock")
                        .insert(name.clone(), (why.clone(), stamp));
                    self.report(Update::Failed(name, why));
                }
            },
        }
    }

    /// Changes the files of module `name` with `write`, off the async
    /// workers and while nothing reads the directory; then, if `write`
    /// succeeded and `compiled` is what its files now hold (a deploy
    /// compiled it to check it), serves it at once: the watcher's look at
    /// the files finds it served, and compiles nothing.
    pub async fn write(
        &self,
        name: &ModuleName,
        write: impl FnOnce() -> std::io::Result<()> + Send + 'static,
        compiled: Option<LoadedModule>,
    ) -> std::io::Result<()> {
        // In the order `reconcile` takes them.
        let _changing = self.change(name).await;
        let _directory = self.directory.lock().await;
        tokio::task::spawn_blocking(write)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the writing thread panicked")))?;
        if let Some(module) = compiled {
            self.insert(module, Instant::now());
        }
        Ok(())
    }

    fn insert(&self, module: LoadedModule, started: Instant) {
        let name = module.name.clone();
        let limits = module.module.limits().clone();
        let from_cache = module.module.from_cache();
        let (module, replaced) = self.registry.insert(module);
        self.failed.lock().expect("loader lock").remove(&name);
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
        self.report(match replaced {
            Some(_) => Update::Replaced(name),
            None => Update::Added(name),
        });
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

/// Which files a module's are, as far as their metadata tells: the module's
/// and its manifest's identity, size and modification time. A file replaced
/// or written to has another.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FilesStamp([Option<(u64, u64, u64, std::time::SystemTime)>; 2]);

impl FilesStamp {
    fn of(module: &Path) -> Option<FilesStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = |path: &Path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((
                metadata.dev(),
                metadata.ino(),
                metadata.len(),
                metadata.modified().ok()?,
            ))
        };
        Some(FilesStamp([
            Some(stamp(module)?),
            stamp(&module.with_extension("toml")),
        ]))
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
    let wasm = Wasm::new(bytes);
    let content_type = manifest
        .content_type
        .as_deref()
        .unwrap_or(DEFAULT_CONTENT_TYPE);
    if let Some(current) = current
        && current.module.digest() == wasm.digest()
        && *current.module.limits() == limits
        && current.content_type == content_type
        && current.calls == manifest.calls
    {
        return Ok(None);
    }
    let (runtime, name, path) = (runtime.clone(), name.clone(), path.to_owned());
    let module = tokio::task::spawn_blocking(move || {
        compile(&runtime, &name, &path, &manifest, &wasm, limits)
    })
    .await
    .context("the compiler thread panicked")??;
    Ok(Some(module))
}

/// The last step of making a module servable, wherever it comes from (a
/// file, `wasmrpc run`, a deploy): compiled within `limits` (what
/// [`limits_of`] made of its manifest), named by its digest, with its
/// manifest's content type. Blocks for as long as compiling takes: call it
/// off the async workers.
pub fn compile(
    runtime: &Runtime,
    name: &ModuleName,
    path: &Path,
    manifest: &Manifest,
    wasm: &Wasm,
    limits: Limits,
) -> anyhow::Result<LoadedModule> {
    let module = runtime.compile(wasm, &limits)?;
    if module.imports_fleet() && manifest.calls.is_none() {
        anyhow::bail!(
            "it imports wasmrpc:compute/fleet but its manifest names no module it may call: \
             add calls = [\"MODULE\", ...] (or [\"*\"]) to {}",
            path.with_extension("toml").display()
        );
    }
    Ok(LoadedModule {
        calls: manifest.calls.clone(),
        name: name.clone(),
        version: module.digest()[..16].to_owned(),
        module,
        path: path.to_owned(),
        content_type: manifest
            .content_type
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
    })
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
