//! Files the node writes, and files it trusts.
//!
//! Writing: every file the node writes (a deployed module and its manifest,
//! a deploy's record, a compiled module in the cache, the cache's key) is
//! written whole or not at all. Its bytes go to a new file with a random
//! name in the target's own directory, created exclusively (so no file or
//! link planted there is opened or followed), synced, then renamed over the
//! target; a [`Transaction`] does that for several files at once and puts
//! every one back as it was if any step fails. Names of files being written
//! start with a dot, which the module loader ignores.
//!
//! Trusting: [`check_private`] refuses a directory or file that another user
//! could have written (as ssh refuses a key others can read), for what the
//! node would otherwise run as native code.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// Writes `contents` to `path` atomically: a reader sees the old file or
/// the new one, never part of either, and nothing planted beside `path` is
/// written through.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut transaction = Transaction::default();
    transaction.write(path, contents, mode)?;
    transaction.commit()
}

/// Creates `path` with `contents` unless it exists. Returns whether this
/// call created it: of several processes racing, exactly one does, and the
/// others find its whole file.
pub fn create_once(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    let staged = stage(path, contents, mode)?;
    match staged.persist_noclobber(path) {
        Ok(_) => {
            sync_parent(path)?;
            Ok(true)
        }
        Err(error) if error.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error.error),
    }
}

/// Several files replaced or removed together: each new file is written in
/// full first (a write that fails changes nothing), then all are renamed
/// into place; if a rename fails, the files already replaced are put back.
#[derive(Default)]
pub struct Transaction {
    steps: Vec<Step>,
}

enum Step {
    Write(PathBuf, NamedTempFile),
    Remove(PathBuf),
}

impl Transaction {
    /// Writes `contents` aside now, to be renamed to `path` on commit.
    pub fn write(&mut self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
        let staged = stage(path, contents, mode)?;
        self.steps.push(Step::Write(path.to_owned(), staged));
        Ok(())
    }

    /// Removes `path` on commit, if it exists then.
    pub fn remove(&mut self, path: &Path) {
        self.steps.push(Step::Remove(path.to_owned()));
    }

    /// Applies every step, in order, or none.
    pub fn commit(self) -> io::Result<()> {
        // A link to each file about to change, so it can be put back.
        let mut backups = Vec::new();
        for step in &self.steps {
            let path = match step {
                Step::Write(path, _) | Step::Remove(path) => path,
            };
            if let Some(backup) = Backup::of(path)? {
                backups.push(backup);
            }
        }
        let mut done = Vec::new();
        for step in self.steps {
            let applied = match step {
                Step::Write(path, staged) => staged
                    .persist(&path)
                    .map(|_| path)
                    .map_err(|error| error.error),
                Step::Remove(path) => match fs::remove_file(&path) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
                    _ => Ok(path),
                },
            };
            match applied {
                Ok(path) => done.push(path),
                Err(error) => {
                    for path in done {
                        match backups.iter_mut().find(|backup| backup.path == path) {
                            Some(backup) => backup.restore(),
                            None => {
                                let _ = fs::remove_file(&path);
                            }
                        }
                    }
                    return Err(error);
                }
            }
        }
        for path in &done {
            sync_parent(path)?;
        }
        Ok(())
    }
}

/// A hard link to a file that a transaction is about to replace or remove,
/// deleted when dropped.
struct Backup {
    path: PathBuf,
    link: Option<NamedTempFile<()>>,
}

impl Backup {
    fn of(path: &Path) -> io::Result<Option<Backup>> {
        match fs::symlink_metadata(path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
            // Nothing can be renamed over a directory: that step fails alone.
            Ok(metadata) if metadata.is_dir() => return Ok(None),
            Ok(_) => {}
        }
        let link = builder().make_in(parent(path), |link| fs::hard_link(path, link))?;
        Ok(Some(Backup {
            path: path.to_owned(),
            link: Some(link),
        }))
    }

    fn restore(&mut self) {
        if let Some(link) = self.link.take()
            && let Err(error) = link.persist(&self.path)
        {
            tracing::error!(
                path = %self.path.display(),
                "failed to put a file back after a failed write: {}",
                error.error
            );
        }
    }
}

fn builder() -> tempfile::Builder<'static, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".wasmrpc-").suffix(".partial");
    builder
}

/// `contents` in a new, synced file beside `path`.
fn stage(path: &Path, contents: &[u8], mode: u32) -> io::Result<NamedTempFile> {
    let mut file = builder()
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(parent(path))?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    Ok(file)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes a rename in `path`'s directory survive a crash.
fn sync_parent(path: &Path) -> io::Result<()> {
    fs::File::open(parent(path))?.sync_all()
}

/// What a private file or directory must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Private {
    /// A directory only its owner can write to.
    Directory,
    /// A regular file (not a link) only its owner can read or write.
    Secret,
}

/// Checks that `path` belongs to this process's user and that no other user
/// can change it (or, for a secret, read it). The error says how to fix it.
pub fn check_private(path: &Path, kind: Private) -> Result<(), String> {
    let metadata = match kind {
        Private::Directory => fs::metadata(path),
        Private::Secret => fs::symlink_metadata(path),
    }
    .map_err(|error| format!("cannot inspect {}: {error}", path.display()))?;
    let shown = path.display();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    if metadata.uid() != user {
        return Err(format!(
            "{shown} belongs to uid {}, not to this node's user (uid {user}): anyone who can \
             write it could make this node run their code; use a {} of this user's own",
            metadata.uid(),
            match kind {
                Private::Directory => "directory",
                Private::Secret => "file",
            }
        ));
    }
    let mode = metadata.mode() & 0o777;
    match kind {
        Private::Directory if !metadata.is_dir() => Err(format!("{shown} is not a directory")),
        Private::Directory if mode & 0o022 != 0 => Err(format!(
            "{shown} is writable by other users (mode {mode:03o}): a file planted there could \
             run as native code in this node; fix it with `chmod go-w {shown}`"
        )),
        Private::Secret if !metadata.is_file() => Err(format!(
            "{shown} is not a regular file (a link, say): delete it, and a new one is made"
        )),
        Private::Secret if mode & 0o077 != 0 => Err(format!(
            "{shown} is readable or writable by other users (mode {mode:03o}): fix it with \
             `chmod 600 {shown}`, or delete it and a new one is made"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fib.wasm");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["fib.wasm"]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600);
    }

    #[test]
    fn a_link_planted_beside_the_target_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        // The names an older wasmrpc wrote aside under, and a few guesses.
        for name in [".fib.wasm.deploy.partial", ".fib.wasm.partial", ".tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        write_atomic(&dir.path().join("fib.wasm"), b"module", 0o644).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read(dir.path().join("fib.wasm")).unwrap(), b"module");
    }

    #[test]
    fn a_transaction_that_fails_puts_every_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, module) = (dir.path().join("fib.toml"), dir.path().join("fib.wasm"));
        fs::write(&manifest, b"old manifest").unwrap();
        fs::write(&module, b"old module").unwrap();
        let mut transaction = Transaction::default();
        transaction
            .write(&manifest, b"new manifest", 0o644)
            .unwrap();
        // A step whose rename must fail: a directory where the file goes.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"").unwrap();
        transaction.write(&blocked, b"x", 0o644).unwrap();
        transaction.write(&module, b"new module", 0o644).unwrap();
        transaction.commit().unwrap_err();
        assert_eq!(fs::read(&manifest).unwrap(), b"old manifest");
        assert_eq!(fs::read(&module).unwrap(), b"old module");
        assert_eq!(names(dir.path()), ["blocked", "fib.toml", "fib.wasm"]);
    }

    #[test]
    fn a_transaction_removes_and_writes_together() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, module) = (dir.path().join("fib.toml"), dir.path().join("fib.wasm"));
        fs::write(&manifest, b"old manifest").unwrap();
        let mut transaction = Transaction::default();
        transaction.remove(&manifest);
        transaction.write(&module, b"module", 0o644).unwrap();
        transaction.commit().unwrap();
        assert_eq!(names(dir.path()), ["fib.wasm"]);
    }

    #[test]
    fn only_one_of_several_creators_makes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        assert!(create_once(&key, b"first", 0o600).unwrap());
        assert!(!create_once(&key, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&key).unwrap(), b"first");
        assert_eq!(names(dir.path()), ["key"]);
    }

    #[test]
    fn private_means_ours_and_closed_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let set = |path: &Path, mode: u32| {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap()
        };
        set(dir.path(), 0o700);
        assert_eq!(check_private(dir.path(), Private::Directory), Ok(()));
        set(dir.path(), 0o755);
        assert_eq!(check_private(dir.path(), Private::Directory), Ok(()));
        set(dir.path(), 0o777);
        let refused = check_private(dir.path(), Private::Directory).unwrap_err();
        assert!(
            refused.contains("mode 777") && refused.contains("chmod go-w"),
            "{refused}"
        );
        set(dir.path(), 0o700);

        let key = dir.path().join("key");
        fs::write(&key, b"k").unwrap();
        set(&key, 0o600);
        assert_eq!(check_private(&key, Private::Secret), Ok(()));
        set(&key, 0o644);
        let refused = check_private(&key, Private::Secret).unwrap_err();
        assert!(refused.contains("chmod 600"), "{refused}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert!(check_private(&link, Private::Secret).is_err());
        assert!(check_private(&key, Private::Directory).is_err());
    }
}
