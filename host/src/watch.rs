//! Which module files changed in the modules directory.
//!
//! The rule (README, "Adding and replacing modules"): a file is looked at when
//! it is closed after being written, or renamed or moved into the directory;
//! it is let go when it is deleted or moved out. Creating or writing a file
//! is not enough, so a module is never read half-written. A `NAME.toml` beside
//! it counts as a change to module `NAME`.

use std::path::Path;

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Something to look at again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The files of the module with this file stem (not yet validated).
    Module(String),
    /// Events were lost: look at the whole directory.
    Everything,
}

/// Watches `dir` until the returned watcher is dropped.
pub fn watch(dir: &Path) -> anyhow::Result<(RecommendedWatcher, mpsc::UnboundedReceiver<Change>)> {
    let (sender, changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!("the modules directory watcher failed, rescanning: {error}");
                let _ = sender.send(Change::Everything);
                return;
            }
        };
        if event.need_rescan() {
            let _ = sender.send(Change::Everything);
            return;
        }
        let settled = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(RemoveKind::File | RemoveKind::Any) => true,
            // A symlink is complete when it is created: no write follows.
            EventKind::Create(CreateKind::File | CreateKind::Any) => {
                event.paths.iter().any(|path| path.is_symlink())
            }
            _ => false,
        };
        if settled {
            for stem in event.paths.iter().filter_map(|path| module_stem(path)) {
                let _ = sender.send(Change::Module(stem));
            }
        }
    })
    .context("failed to create the modules directory watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("failed to watch the modules directory {}", dir.display()))?;
    Ok((watcher, changes))
}

/// `fib` for `fib.wasm` and `fib.toml`; `None` for other files.
pub fn module_stem(path: &Path) -> Option<String> {
    let extension = path.extension()?;
    if extension != "wasm" && extension != "toml" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    (!stem.starts_with('.')).then(|| stem.to_owned())
}
