//! The compile cache: a restarted node loads what it compiled before, and
//! never loads an artifact it did not write itself.

use wasmrpc::names::ModuleName;

use crate::support::TestNode;

async fn start(cache: &std::path::Path) -> TestNode {
    let cache = cache.to_owned();
    TestNode::setup(&["fib"])
        .config(move |config| config.cache_dir = Some(cache))
        .start()
        .await
}

fn from_cache(node: &TestNode) -> bool {
    let fib: ModuleName = "fib".parse().unwrap();
    node.registry
        .get(&fib)
        .expect("fib is served")
        .module
        .from_cache()
}

fn artifacts(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cwasm"))
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_loads_its_modules_from_its_cache() {
    let cache = tempfile::tempdir().unwrap();
    let mut first = start(cache.path()).await;
    assert!(!from_cache(&first), "an empty cache cannot supply fib");
    first.stop().await.unwrap();
    assert_eq!(artifacts(cache.path()).len(), 1);

    let second = start(cache.path()).await;
    assert!(from_cache(&second), "the second start compiled fib again");
    assert_eq!(second.call("fib", "30").await.body, b"832040");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_this_node_did_not_write_is_never_loaded() {
    let cache = tempfile::tempdir().unwrap();
    start(cache.path()).await.stop().await.unwrap();
    let [artifact] = artifacts(cache.path()).try_into().unwrap();

    // Altered code: its tag no longer matches.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let mut node = start(cache.path()).await;
    assert!(!from_cache(&node), "an altered artifact was loaded");
    assert_eq!(node.call("fib", "30").await.body, b"832040");
    node.stop().await.unwrap();

    // The compile rewrote it: trusted again.
    let mut node = start(cache.path()).await;
    assert!(from_cache(&node));
    node.stop().await.unwrap();

    // Another node's key: nothing it holds is trusted here.
    std::fs::write(
        cache.path().join(wasmrpc::runtime::CACHE_KEY_FILE),
        [7u8; 32],
    )
    .unwrap();
    let node = start(cache.path()).await;
    assert!(
        !from_cache(&node),
        "an artifact tagged with another key was loaded"
    );
    assert_eq!(node.call("fib", "30").await.body, b"832040");
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_module_again_and_again_keeps_the_cache_under_its_cap() {
    use crate::live::{install, version_of};
    use crate::support::guests;

    let cache = tempfile::tempdir().unwrap();
    start(cache.path()).await.stop().await.unwrap();
    let [first] = artifacts(cache.path()).try_into().unwrap();
    let entry = std::fs::metadata(&first).unwrap().len();
    // Room for two compiled versions of fib, not three.
    let cap = entry * 5 / 2;
    let dir = cache.path().to_owned();
    let node = TestNode::setup(&["fib"])
        .config(move |config| {
            config.cache_dir = Some(dir);
            config.cache_size = cap;
        })
        .start()
        .await;
    let fib_name: ModuleName = "fib".parse().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let mut newest = Vec::new();
    for round in 0..4 {
        newest = guests::variant(&fib, &format!("round {round}"));
        install(node.modules_path(), "fib", &newest);
        let version = version_of(&newest);
        node.until_registry(std::time::Duration::from_secs(10), |registry| {
            registry.get(&fib_name).unwrap().version == version
        })
        .await;
        let total: u64 = artifacts(cache.path())
            .iter()
            .map(|path| std::fs::metadata(path).unwrap().len())
            .sum();
        assert!(
            total <= cap,
            "round {round}: {total} bytes cached, cap {cap}"
        );
    }
    assert_eq!(artifacts(cache.path()).len(), 2);
    assert_eq!(node.call("fib", "30").await.body, b"832040");
    drop(node);

    // What was kept is what serves: a restart loads it without compiling.
    let dir = cache.path().to_owned();
    let node = TestNode::setup(&[])
        .file("fib.wasm", newest)
        .config(move |config| config.cache_dir = Some(dir))
        .start()
        .await;
    assert!(from_cache(&node), "the version serving was evicted");
}
