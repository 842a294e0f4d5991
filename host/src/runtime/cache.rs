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

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The cache's key, inside its directory.
pub const KEY_FILE: &str = "key";

const TAG_LEN: usize = 32;

pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl ArtifactCache {
    /// Opens the cache in `dir`, creating the directory and its key if needed.
    pub fn open(dir: &Path) -> anyhow::Result<ArtifactCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("failed to create the cache directory {}", dir.display()))?;
        let key = read_or_create_key(&dir.join(KEY_FILE))?;
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            key,
        })
    }

    /// The artifact stored as `name`, if its tag proves this cache wrote it.
    pub fn load(&self, name: &str) -> Option<Vec<u8>> {
        let entry = fs::read(self.path(name)).ok()?;
        if entry.len() < TAG_LEN {
            return None;
        }
        let (tag, artifact) = entry.split_at(TAG_LEN);
        match self.mac(name, artifact).verify_slice(tag) {
            Ok(()) => Some(artifact.to_vec()),
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
        // Written aside, then renamed: a reader sees a whole entry or none.
        let partial = self
            .dir
            .join(format!(".{name}.{}.partial", std::process::id()));
        let written = fs::File::create(&partial)
            .and_then(|mut file| {
                file.write_all(&tag)?;
                file.write_all(artifact)
            })
            .and_then(|()| fs::rename(&partial, self.path(name)));
        if let Err(error) = written {
            let _ = fs::remove_file(&partial);
            tracing::warn!(dir = %self.dir.display(), "failed to cache a compiled module: {error}");
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cwasm"))
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
    if !path.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|error| anyhow::anyhow!("no randomness for the cache key: {error}"))?;
        // Made aside, then linked into place: two nodes starting at once
        // agree on one key, and nobody reads a half-written one.
        let partial = path.with_extension(format!("{}.partial", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|mut file| file.write_all(&key))
            .with_context(|| format!("failed to write the cache key {}", partial.display()))?;
        let linked = fs::hard_link(&partial, path);
        let _ = fs::remove_file(&partial);
        if let Err(error) = linked
            && error.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(error)
                .with_context(|| format!("failed to create the cache key {}", path.display()));
        }
    }
    let key = fs::read(path)
        .with_context(|| format!("failed to read the cache key {}", path.display()))?;
    key.try_into().map_err(|_| {
        anyhow::anyhow!(
            "the cache key {} is not 32 bytes: delete it",
            path.display()
        )
    })
}
