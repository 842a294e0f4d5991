//! `wasmrpc new`: a project of each language builds, with its one command,
//! into a module that a running node then serves.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cli::text;
use crate::support::{TestNode, guests};

/// `wasmrpc new NAME FLAGS --dir DIR --modules MODULES`, then the project's
/// `build`: what each printed. A JavaScript project borrows the guests'
/// componentize-js rather than fetch it.
async fn make_and_build(
    name: &str,
    flags: &[&str],
    dir: &std::path::Path,
    modules: &std::path::Path,
) -> (std::process::Output, std::process::Output) {
    let (name, dir, modules) = (name.to_owned(), dir.to_owned(), modules.to_owned());
    let flags: Vec<String> = flags.iter().map(|flag| flag.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let made = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
            .args(["new", &name])
            .args(&flags)
            .arg("--dir")
            .arg(&dir)
            .arg("--modules")
            .arg(&modules)
            .env_remove("WASMRPC_MODULES")
            .output()
            .unwrap();
        if flags.iter().any(|flag| flag == "js") {
            std::os::unix::fs::symlink(
                guests::repo().join("guests/js/node_modules"),
                dir.join("node_modules"),
            )
            .unwrap();
        }
        // Guest builds share a target directory across runs.
        let built = Command::new(dir.join("build"))
            .env(
                "CARGO_TARGET_DIR",
                guests::repo().join("guests/target/new-projects"),
            )
            .env_remove("WASMRPC_MODULES")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .unwrap();
        (made, built)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_project_of_each_language_builds_into_a_served_module() {
    let cache = guests::repo().join("guests/target/test-cache");
    let node = TestNode::setup(&[])
        .config(move |config| config.cache_dir = Some(cache))
        .start()
        .await;
    let client = node.client().await;
    let projects = tempfile::tempdir().unwrap();
    // The JavaScript project would fetch componentize-js: lend it ours.
    guests::lang("jsstats");
    for lang in ["c", "python", "js", "rust"] {
        let name = format!("hello-{lang}");
        let dir = projects.path().join(&name);
        let modules = node.modules_path().to_owned();
        let (made, built) = make_and_build(&name, &["--lang", lang], &dir, &modules).await;
        assert_eq!(
            made.status.code(),
            Some(0),
            "new {lang}: {}",
            text(&made.stderr)
        );
        assert!(
            text(&made.stdout).contains("/build"),
            "{}",
            text(&made.stdout)
        );
        assert!(
            built.status.success(),
            "{name}/build failed:\n{}{}",
            text(&built.stdout),
            text(&built.stderr)
        );
        assert!(node.modules_path().join(format!("{name}.wasm")).is_file());

        // The node follows its directory: the new module is served.
        let started = Instant::now();
        let reply = loop {
            let reply = client
                .call(&name, b"world", Duration::from_secs(30))
                .await
                .unwrap();
            if reply.error.as_deref() != Some("not_found") {
                break reply;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{name} was never served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (reply.error.as_deref(), text(&reply.body).as_str()),
            (None, "hello, world"),
            "{name}"
        );
    }

    // A project is never made over something that exists.
    let again = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
        .args(["new", "hello-c", "--lang", "c", "--dir"])
        .arg(projects.path().join("hello-c"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_fleet_project_builds_into_a_module_that_calls_fib() {
    let node = TestNode::start(&["fib"]).await;
    let projects = tempfile::tempdir().unwrap();
    let dir = projects.path().join("fibs");
    let modules = node.modules_path().to_owned();
    let (made, built) =
        make_and_build("fibs", &["--lang", "rust", "--fleet"], &dir, &modules).await;
    assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
    assert!(
        built.status.success(),
        "fibs/build failed:\n{}{}",
        text(&built.stdout),
        text(&built.stderr)
    );
    // The build put the manifest beside the module: it loads, and may call fib.
    node.until_registry(Duration::from_secs(60), |registry| {
        registry.get(&"fibs".parse().unwrap()).is_some()
    })
    .await;
    let reply = node.call("fibs", "10 20").await;
    assert_eq!(
        (reply.error.as_deref(), text(&reply.body).as_str()),
        (None, "55 6765")
    );

    // Only Rust projects call the fleet.
    let refused = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
        .args(["new", "other", "--lang", "c", "--fleet", "--dir"])
        .arg(projects.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("--fleet makes Rust projects only"));
}
