//! Compiled modules on disk, so that a restarted node skips the compiler.
//!
//! An entry is named by the SHA-256 of the module and a fingerprint of the
//! engine that compiled it (wasmtime's version, the target, and every setting
//! that shapes code, the stack limit among them): a new wasmtime or another
//! configuration simply misses.
//!
//! Loading compiled code is `unsafe`: a forged or damaged artifact could do
//! anything once mapped as code. Every entry therefore carries an
//! HMAC-SHA256 tag made with this cache's key ([`KEY_FILE`], 32 random bytes
//! made on first use, readable by its owner only), and only entries whose tag
//! checks are ever loaded: artifacts compiled by a node holding the key. Any
//! other file is ignored, and overwritten by the next compile.
//!
//! The tag is only as good as the key's secrecy, so the cache is used only
//! when its directory belongs to the node's user and no other user can write
//! to it, and its key belongs to that user and no other can read or write it
//! (as ssh treats its keys): otherwise someone else could have planted a key,
//! and code tagged with it. [`ArtifactCache::open`] refuses such a cache and
//! says how to fix it.
//!
//! The cache holds at most its size cap: each module replaced leaves its old
//! entry behind, so after every store the entries used least recently (by
//! modification time, which a load refreshes) are deleted until the rest
//! fit. The entry just stored is always kept.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::files::{self, Private};
use crate::units::Bytes;

/// The cache's key, inside its directory.
pub const KEY_FILE: &str = "key";

/// The cache's size cap unless configured: a few hundred typical modules.
pub const DEFAULT_SIZE: u64 = 1 << 30;

const TAG_LEN: usize = 32;

const ENTRY_EXTENSION: &str = "cwasm";

pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
    /// The most bytes its entries may take together.
    cap: u64,
}

impl ArtifactCache {
    /// Opens the cache in `dir`, creating the directory and its key if
    /// needed, and trims it to `cap` bytes. Refuses a directory or key that
    /// another user could have written (see the module's documentation).
    pub fn open(dir: &Path, cap: u64) -> anyhow::Result<ArtifactCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("failed to create the cache directory {}", dir.display()))?;
        files::check_private(dir, Private::Directory)
            .map_err(|why| anyhow::anyhow!("refusing the compile cache: {why}"))?;
        let key = read_or_create_key(&dir.join(KEY_FILE))?;
        let cache = ArtifactCache {
            dir: dir.to_owned(),
            key,
            cap,
        };
        cache.evict(None);
        Ok(cache)
    }

    /// The artifact stored as `name`, if its tag proves this cache wrote it.
    pub fn load(&self, name: &str) -> Option<Vec<u8>> {
        let entry = fs::read(self.path(name)).ok()?;
        if entry.len() < TAG_LEN {
            return None;
        }
        let (tag, artifact) = entry.split_at(TAG_LEN);
        match self.mac(name, artifact).verify_slice(tag) {
            Ok(()) => {
                // Used now: the last to be evicted.
                let _ = fs::File::open(self.path(name))
                    .and_then(|file| file.set_modified(SystemTime::now()));
                Some(artifact.to_vec())
            }
            Err(_) => {
                tracing::warn!(entry = %self.path(name).display(), "ignoring a cache entry this node did not write");
                None
            }
        }
    }

    /// Stores `artifact` as `name`. A failure costs only a later recompile,
    /// so it is logged, not returned.
    pub fn store(&self, name: &str, artifact: &[u8]) {
        let tag = self.mac(name, artifact).finalize().into_bytes();
        let entry = [tag.as_slice(), artifact].concat();
        if let Err(error) = files::write_atomic(&self.path(name), &entry, 0o600) {
            tracing::warn!(dir = %self.dir.display(), "failed to cache a compiled module: {error}");
            return;
        }
        self.evict(Some(&self.path(name)));
    }

    /// Deletes the entries used least recently until the rest fit the cap,
    /// never `keep`. Several nodes may share a cache and evict at once: an
    /// entry already gone is no error.
    fn evict(&self, keep: Option<&Path>) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .path()
                    .extension()
                    .is_some_and(|ext| ext == ENTRY_EXTENSION)
            })
            .filter_map(|entry| {
                let metadata = entry.metadata().ok()?;
                Some((metadata.modified().ok()?, metadata.len(), entry.path()))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
        if total <= self.cap {
            return;
        }
        entries.sort();
        let (mut evicted, mut freed) = (0, 0);
        for (_, size, path) in entries {
            if total <= self.cap {
                break;
            }
            if Some(path.as_path()) == keep {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    (evicted, freed) = (evicted + 1, freed + size);
                    total -= size;
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => total -= size,
                Err(error) => {
                    tracing::warn!(entry = %path.display(), "failed to evict a cache entry: {error}")
                }
            }
        }
        if evicted > 0 {
            tracing::info!(
                dir = %self.dir.display(),
                evicted,
                freed = %Bytes(freed),
                cap = %Bytes(self.cap),
                "evicted the compiled modules used least recently"
            );
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.{ENTRY_EXTENSION}"))
    }

    /// The tag binds the artifact to its name, so an entry cannot be passed
    /// off as another module's.
    fn mac(&self, name: &str, artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(artifact);
        mac
    }
}

fn read_or_create_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|error| anyhow::anyhow!("no randomness for the cache key: {error}"))?;
    // Two nodes starting at once agree on one key, and nobody reads a
    // half-written one.
    files::create_once(path, &key, 0o600)
        .with_context(|| format!("failed to create the cache key {}", path.display()))?;
    files::check_private(path, Private::Secret)
        .map_err(|why| anyhow::anyhow!("refusing the compile cache's key: {why}"))?;
    let mut read = Vec::new();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut file| file.read_to_end(&mut read))
        .with_context(|| format!("failed to read the cache key {}", path.display()))?;
    read.try_into().map_err(|_| {
        anyhow::anyhow!(
            "the cache key {} is not 32 bytes: delete it",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".cwasm").map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_entries_used_least_recently_go_first() {
        let dir = tempfile::tempdir().unwrap();
        // Room for three entries of 1000 bytes and their tags.
        let cache = ArtifactCache::open(dir.path(), 3 * (1000 + TAG_LEN as u64)).unwrap();
        let artifact = vec![7u8; 1000];
        let age = |name: &str, seconds_ago: u64| {
            let file = fs::File::open(cache.path(name)).unwrap();
            let when = SystemTime::now() - std::time::Duration::from_secs(seconds_ago);
            file.set_modified(when).unwrap();
        };
        for (name, seconds_ago) in [("a", 30), ("b", 20), ("c", 10)] {
            cache.store(name, &artifact);
            age(name, seconds_ago);
        }
        assert_eq!(entries(dir.path()), ["a", "b", "c"]);
        // Loading `a` makes it the most recently used: `b` is older now.
        assert!(cache.load("a").is_some());
        cache.store("d", &artifact);
        assert_eq!(entries(dir.path()), ["a", "c", "d"]);
        // An entry larger than the whole cap is kept while it is the newest.
        cache.store("huge", &vec![1u8; 10_000]);
        assert_eq!(entries(dir.path()), ["huge"]);
        assert!(cache.load("huge").is_some());
    }

    #[test]
    fn a_cache_others_could_write_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let set = |path: &Path, mode: u32| {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        set(dir.path(), 0o777);
        fs::write(dir.path().join(KEY_FILE), [7u8; 32]).unwrap();
        let error = format!(
            "{:#}",
            ArtifactCache::open(dir.path(), DEFAULT_SIZE).err().unwrap()
        );
        assert!(error.contains("chmod go-w"), "{error}");

        set(dir.path(), 0o700);
        set(&dir.path().join(KEY_FILE), 0o644);
        let error = format!(
            "{:#}",
            ArtifactCache::open(dir.path(), DEFAULT_SIZE).err().unwrap()
        );
        assert!(error.contains("chmod 600"), "{error}");

        set(&dir.path().join(KEY_FILE), 0o600);
        ArtifactCache::open(dir.path(), DEFAULT_SIZE).unwrap();
    }

    #[test]
    fn a_new_cache_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        ArtifactCache::open(&dir, DEFAULT_SIZE).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    }

    #[test]
    fn a_lower_cap_trims_the_cache_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), DEFAULT_SIZE).unwrap();
        for name in ["a", "b", "c", "d"] {
            cache.store(name, &[0u8; 500]);
        }
        drop(cache);
        ArtifactCache::open(dir.path(), 1100).unwrap();
        assert_eq!(entries(dir.path()).len(), 2);
    }
}
