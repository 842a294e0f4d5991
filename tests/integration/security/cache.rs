//! The compile cache trusts only what the node's user owns: a cache others
//! can write to, or a key others can read, is refused, so compiled code
//! planted there with a planted key never runs.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use wasmrpc::names::ModuleName;

use crate::support::{TestNode, guests};

async fn start(cache: &Path) -> TestNode {
    let cache = cache.to_owned();
    TestNode::setup(&["fib", "upcase"])
        .config(move |config| config.cache_dir = Some(cache))
        .start()
        .await
}

/// The cache entry of the module whose bytes are `wasm`.
fn entry_of(cache: &Path, wasm: &[u8]) -> std::path::PathBuf {
    let digest = hex::encode(Sha256::digest(wasm));
    std::fs::read_dir(cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&digest)
        })
        .expect("the module is in the cache")
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn compiled_code_planted_with_a_planted_key_never_runs() {
    let cache = tempfile::tempdir().unwrap();
    start(cache.path()).await.stop().await.unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let upcase = std::fs::read(guests::wasm("upcase")).unwrap();
    let (fib_entry, upcase_entry) = (
        entry_of(cache.path(), &fib),
        entry_of(cache.path(), &upcase),
    );

    // Someone else's key, and upcase's code filed as fib's, tagged with it,
    // in a cache directory anyone may write to.
    let key = [42u8; 32];
    std::fs::write(cache.path().join(wasmrpc::runtime::CACHE_KEY_FILE), key).unwrap();
    let code = std::fs::read(&upcase_entry).unwrap().split_off(32);
    let name = fib_entry.file_stem().unwrap().to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(&code);
    let forged = [mac.finalize().into_bytes().as_slice(), &code].concat();
    std::fs::write(&fib_entry, forged).unwrap();
    set_mode(cache.path(), 0o777);

    let fib_name: ModuleName = "fib".parse().unwrap();
    let node = start(cache.path()).await;
    assert!(!node.registry.get(&fib_name).unwrap().module.from_cache());
    let reply = node.call("fib", "abc").await;
    assert_eq!(
        reply.error.as_deref(),
        Some("bad_request"),
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    drop(node);

    // Closed to others, but with a key others can read: refused too.
    set_mode(cache.path(), 0o700);
    set_mode(&cache.path().join(wasmrpc::runtime::CACHE_KEY_FILE), 0o644);
    let node = start(cache.path()).await;
    assert!(!node.registry.get(&fib_name).unwrap().module.from_cache());
    assert_eq!(
        node.call("fib", "abc").await.error.as_deref(),
        Some("bad_request")
    );
    drop(node);

    // The same files, private: what the check stands between.
    set_mode(&cache.path().join(wasmrpc::runtime::CACHE_KEY_FILE), 0o600);
    let node = start(cache.path()).await;
    assert!(node.registry.get(&fib_name).unwrap().module.from_cache());
    assert_eq!(node.call("fib", "abc").await.body, b"ABC");
}
