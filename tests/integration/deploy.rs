//! `wasmrpc deploy` and `undeploy`: a module signed by a trusted key reaches
//! every node that takes deploys and nothing else does.

use std::path::Path;
use std::time::{Duration, Instant};

use wasmrpc::deploy::TrustedKeys;
use wasmrpc::names::ModuleName;

use crate::cli::{run, text, wasmrpc};
use crate::live::version_of;
use crate::support::{TestNode, guests, unique};

struct Fleet {
    exchange: String,
    keys: tempfile::TempDir,
    /// Two nodes that trust `keys/trusted.key`, one that takes no deploys.
    takers: [TestNode; 2],
    other: TestNode,
}

async fn fleet() -> Fleet {
    let keys = tempfile::tempdir().unwrap();
    for name in ["trusted", "stranger"] {
        let out = keys.path().join(format!("{name}.key"));
        let made = run(wasmrpc(
            "unused",
            &["keygen", "--out", out.to_str().unwrap()],
        ))
        .await;
        assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
    }
    let trusted = TrustedKeys::read(&keys.path().join("trusted.key.pub")).unwrap();
    let exchange = unique("deploy");
    let taker = || {
        let trusted = trusted.clone();
        TestNode::setup(&[])
            .exchange(&exchange)
            .config(move |config| {
                config.accept_deploys = Some(trusted);
                config.deploy_limit = 1 << 20;
            })
            .start()
    };
    let takers = [taker().await, taker().await];
    let other = TestNode::setup(&[]).exchange(&exchange).start().await;
    Fleet {
        exchange,
        keys,
        takers,
        other,
    }
}

impl Fleet {
    /// `wasmrpc ARGS --key KEY.key`: exit code, stdout, stderr.
    async fn wasmrpc(&self, args: &[&str], key: &str) -> (Option<i32>, String, String) {
        let key = self.keys.path().join(format!("{key}.key"));
        let mut args = args.to_vec();
        args.extend(["--key", key.to_str().unwrap(), "--wait", "5s"]);
        let output = run(wasmrpc(&self.exchange, &args)).await;
        (
            output.status.code(),
            text(&output.stdout),
            text(&output.stderr),
        )
    }

    /// Waits until every taker serves `name` in `version` (`None`: not at all).
    async fn served_everywhere(&self, name: &str, version: Option<&str>) {
        let name: ModuleName = name.parse().unwrap();
        let started = Instant::now();
        for node in &self.takers {
            loop {
                let now = node
                    .registry
                    .get(&name)
                    .map(|module| module.version.clone());
                if now.as_deref() == version {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "node {} serves {name} in {now:?}, not {version:?}",
                    node.id
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_deploy_reaches_every_node_that_takes_deploys() {
    let fleet = fleet().await;
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let module = write(dir.path(), "anything.wasm", &fib);
    let manifest = write(
        dir.path(),
        "m.toml",
        "content_type = \"application/json\"\n",
    );

    let (code, stdout, stderr) = fleet
        .wasmrpc(
            &["deploy", &module, "--name", "fibd", "--manifest", &manifest],
            "trusted",
        )
        .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let version = version_of(&fib);
    for node in &fleet.takers {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&node.id))
            .unwrap_or_else(|| panic!("node {} did not answer:\n{stdout}", node.id));
        assert!(
            line.contains("took it") && line.contains(&version),
            "{line}"
        );
    }
    assert!(!stdout.contains(&fleet.other.id), "{stdout}");

    fleet.served_everywhere("fibd", Some(&version)).await;
    for node in &fleet.takers {
        assert_eq!(
            std::fs::read(node.modules_path().join("fibd.wasm")).unwrap(),
            fib
        );
        assert!(node.modules_path().join("fibd.toml").is_file());
    }
    // What `wasmrpc modules` shows: the same version on both, on no other.
    let nodes = fleet
        .other
        .client()
        .await
        .fleet(Duration::from_secs(1))
        .await
        .unwrap();
    let serving: Vec<(&str, &str)> = nodes
        .iter()
        .flat_map(|node| {
            node.modules
                .iter()
                .map(move |module| (node.node.as_str(), module.version.as_str()))
        })
        .collect();
    assert_eq!(serving.len(), 2, "{serving:?}");
    assert!(
        serving.iter().all(|(_, served)| *served == version),
        "{serving:?}"
    );
    let reply = fleet.takers[0].call("fibd", "10").await;
    assert_eq!(reply.body, b"55");
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_broken_or_oversized_deploys_are_refused_and_change_nothing() {
    let fleet = fleet().await;
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "fibd.wasm", &fib);
    let (code, stdout, _) = fleet.wasmrpc(&["deploy", &good], "trusted").await;
    assert_eq!(code, Some(0), "{stdout}");
    let version = version_of(&fib);
    fleet.served_everywhere("fibd", Some(&version)).await;

    let newer = write(dir.path(), "newer.wasm", guests::variant(&fib, "newer"));
    let broken = write(dir.path(), "broken.wasm", b"\0asm but not a module");
    let huge = write(
        dir.path(),
        "huge.wasm",
        guests::variant(&fib, &"x".repeat(2 << 20)),
    );
    for (file, key, reason) in [
        (&newer, "stranger", "which this node does not trust"),
        (&broken, "trusted", "not a module this node can serve"),
        (&huge, "trusted", "over this node's deploy limit of 1 MiB"),
    ] {
        let (code, stdout, stderr) = fleet
            .wasmrpc(&["deploy", file, "--name", "fibd"], key)
            .await;
        assert_eq!(code, Some(1), "{file}: {stdout}{stderr}");
        assert!(
            stderr.contains("2 of 2 nodes refused the deploy of fibd"),
            "{stderr}"
        );
        let refusals = stdout
            .lines()
            .filter(|line| line.contains("refused"))
            .count();
        assert_eq!(refusals, 2, "{file}: {stdout}");
        assert!(stdout.contains(reason), "{file}: {stdout}");
        // The last good version serves on, and its file is untouched.
        for node in &fleet.takers {
            assert_eq!(
                std::fs::read(node.modules_path().join("fibd.wasm")).unwrap(),
                fib
            );
        }
    }
    fleet.served_everywhere("fibd", Some(&version)).await;
    assert_eq!(fleet.takers[1].call("fibd", "20").await.body, b"6765");
    // Undeploying takes a trusted key too.
    let (code, _, _) = fleet.wasmrpc(&["undeploy", "fibd"], "stranger").await;
    assert_eq!(code, Some(1));
    fleet.served_everywhere("fibd", Some(&version)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn undeploy_takes_a_module_off_every_node() {
    let fleet = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let module = write(
        dir.path(),
        "fibd.wasm",
        std::fs::read(guests::wasm("fib")).unwrap(),
    );
    let (code, stdout, _) = fleet.wasmrpc(&["deploy", &module], "trusted").await;
    assert_eq!(code, Some(0), "{stdout}");
    fleet
        .served_everywhere("fibd", Some(&version_of(&std::fs::read(&module).unwrap())))
        .await;

    let (code, stdout, stderr) = fleet.wasmrpc(&["undeploy", "fibd"], "trusted").await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.matches("took it").count(), 2, "{stdout}");
    fleet.served_everywhere("fibd", None).await;
    for node in &fleet.takers {
        assert!(!node.modules_path().join("fibd.wasm").exists());
    }

    // Nobody takes deploys on an exchange without such nodes: exit 3.
    let lonely = TestNode::start(&[]).await;
    let key = fleet.keys.path().join("trusted.key");
    let output = run(wasmrpc(
        lonely.exchange(),
        &[
            "deploy",
            &module,
            "--key",
            key.to_str().unwrap(),
            "--wait",
            "500ms",
        ],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_says_who_still_compiles_and_refuses_what_is_in_the_wrong_place() {
    let fleet = fleet().await;
    let dir = tempfile::tempdir().unwrap();

    // A public key where the secret one belongs.
    let fib = write(
        dir.path(),
        "fibd.wasm",
        std::fs::read(guests::wasm("fib")).unwrap(),
    );
    let public = fleet.keys.path().join("trusted.key.pub");
    let output = run(wasmrpc(
        &fleet.exchange,
        &["deploy", &fib, "--key", public.to_str().unwrap()],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("is a public key: sign with the secret key"),
        "{}",
        text(&output.stderr)
    );

    // An undeploy of a module the nodes do not have.
    let (code, stdout, stderr) = fleet.wasmrpc(&["undeploy", "nosuch"], "trusted").await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.matches("this node has no module nosuch").count(),
        2,
        "{stdout}"
    );

    // A module that takes seconds to compile, with a wait shorter than that:
    // each node says it is compiling, and deploy says so. (These nodes take
    // modules as large as a Python one.)
    let trusted = TrustedKeys::read(&fleet.keys.path().join("trusted.key.pub")).unwrap();
    let exchange = unique("compiling");
    let taker = || {
        let trusted = trusted.clone();
        TestNode::setup(&[])
            .exchange(&exchange)
            .config(move |config| config.accept_deploys = Some(trusted))
            .start()
    };
    let takers = [taker().await, taker().await];
    let pyfib = write(
        dir.path(),
        "pyfib.wasm",
        std::fs::read(guests::lang("pyfib")).unwrap(),
    );
    let key = fleet.keys.path().join("trusted.key");
    let started = Instant::now();
    let output = run(wasmrpc(
        &exchange,
        &[
            "deploy",
            &pyfib,
            "--key",
            key.to_str().unwrap(),
            "--wait",
            "1s",
        ],
    ))
    .await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(3), "{stdout}{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let compiling = stdout
        .lines()
        .filter(|line| line.contains("compiling  still compiling the module"))
        .count();
    assert_eq!(compiling, 2, "{stdout}");
    assert!(
        stderr.contains(
            "2 of 2 nodes did not finish the deploy of pyfib within 1.0 s (2 still compiling it)"
        ),
        "{stderr}"
    );
    // They took it once compiled.
    let version = version_of(&std::fs::read(&pyfib).unwrap());
    let started = Instant::now();
    for node in &takers {
        while node
            .registry
            .get(&"pyfib".parse().unwrap())
            .map(|module| module.version.clone())
            != Some(version.clone())
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "pyfib never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
