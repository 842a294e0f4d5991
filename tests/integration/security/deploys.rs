//! Deploy orders as a broker user with read access to the control exchange
//! would use them: captured and replayed, sent to another fleet, dated out
//! of their window, replayed in a flood; and deploys whose files cannot be
//! written as they should.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use wasmrpc::deploy::{Action, Order, SecretKey};
use wasmrpc::names::ModuleName;

use super::{Keys, Spy, deployer, files_under, refused, write};
use crate::live::version_of;
use crate::support::process::Spawn;
use crate::support::{TestNode, amqp_url, guests, unique};

/// A node on `exchange` that takes orders signed by `keys`.
fn taker(exchange: &str, keys: &Keys) -> crate::support::node::Setup {
    let trusted = keys.trusted();
    TestNode::setup(&[])
        .exchange(exchange)
        .config(move |config| config.accept_deploys = Some(trusted))
}

/// Waits until `node` serves `name` in `version` (`None`: not at all).
async fn serves(node: &TestNode, name: &str, version: Option<&str>) {
    let name: ModuleName = name.parse().unwrap();
    let started = Instant::now();
    loop {
        let now = node
            .registry
            .get(&name)
            .map(|module| module.version.clone());
        if now.as_deref() == version {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the node serves {name} in {now:?}, not {version:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_captured_order_replayed_changes_nothing_anywhere() {
    let keys = Keys::new().await;
    let exchange = unique("replay");
    let node = taker(&exchange, &keys).start().await;
    let mut spy = Spy::on(&amqp_url(), &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let versions: Vec<Vec<u8>> = (1..=3)
        .map(|n| guests::variant(&fib, &format!("v{n}")))
        .collect();
    let deploy = async |n: usize| {
        let file = write(dir.path(), &format!("v{n}.wasm"), &versions[n - 1]);
        let deployed = deployer(
            &amqp_url(),
            &exchange,
            &keys,
            &["deploy", &file, "--name", "sfib"],
        )
        .await;
        assert_eq!(
            deployed.code,
            Some(0),
            "{}{}",
            deployed.stdout,
            deployed.stderr
        );
    };

    deploy(1).await;
    let v1 = spy.capture().await;
    deploy(2).await;
    let v2 = spy.capture().await;
    let version2 = version_of(&versions[1]);
    serves(&node, "sfib", Some(&version2)).await;

    // Rolled back: the old order is older than the one taken.
    refused(&spy.replay(&exchange, &v1, 1).await, "took a newer order");
    // The same order again: taken once.
    refused(&spy.replay(&exchange, &v2, 1).await, "already");
    serves(&node, "sfib", Some(&version2)).await;

    // An undeploy leaves its record: the deploy before it cannot come back.
    let undeployed = deployer(&amqp_url(), &exchange, &keys, &["undeploy", "sfib"]).await;
    assert_eq!(undeployed.code, Some(0), "{}", undeployed.stderr);
    let undeploy = spy.capture().await;
    serves(&node, "sfib", None).await;
    refused(&spy.replay(&exchange, &v2, 1).await, "took a newer order");
    assert!(!node.modules_path().join("sfib.wasm").exists());

    // A newer deploy, then the old undeploy again: it removes nothing.
    deploy(3).await;
    let v3 = spy.capture().await;
    let version3 = version_of(&versions[2]);
    serves(&node, "sfib", Some(&version3)).await;
    refused(
        &spy.replay(&exchange, &undeploy, 1).await,
        "took a newer order",
    );
    serves(&node, "sfib", Some(&version3)).await;

    // Another fleet whose nodes trust the same key: the order names its own.
    let other_exchange = unique("replay-other");
    let other = taker(&other_exchange, &keys).start().await;
    refused(
        &spy.replay(&other_exchange, &v3, 1).await,
        &format!("for the fleet on exchange {exchange:?}"),
    );
    serves(&other, "sfib", None).await;

    // A restarted node remembers what it took: its records are on disk.
    let files = files_under(node.modules_path());
    assert!(
        files.iter().any(|(name, _)| name == ".deploys/sfib.json"),
        "{:?}",
        files.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );
    drop(node);
    let mut restarted = taker(&exchange, &keys);
    for (name, contents) in files {
        restarted = restarted.file(&name, contents);
    }
    let restarted = restarted.start().await;
    serves(&restarted, "sfib", Some(&version3)).await;
    refused(&spy.replay(&exchange, &v3, 1).await, "already");
    refused(&spy.replay(&exchange, &v1, 1).await, "took a newer order");
    serves(&restarted, "sfib", Some(&version3)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_dated_out_of_their_window_or_from_an_older_wasmrpc_are_refused() {
    let keys = Keys::new().await;
    let exchange = unique("dated");
    let node = taker(&exchange, &keys).start().await;
    let mut spy = Spy::on(&amqp_url(), &exchange).await;
    let key = SecretKey::read(&keys.secret()).unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let dated = |offset_ms: i64| {
        let mut order = Order::new(
            Action::Deploy,
            &exchange,
            "sfib".parse().unwrap(),
            fib.clone(),
            None,
        );
        order.stamp.issued_ms = order.stamp.issued_ms.checked_add_signed(offset_ms).unwrap();
        let signed = order.sign(&key);
        let (properties, body) = order.to_message(&signed);
        (properties, body.to_vec())
    };
    for (offset_ms, why) in [
        (290_000, "ahead of this node's clock"),
        (60_000, "ahead of this node's clock"),
        (-310_000, "orders older than 300 s are refused"),
    ] {
        let (properties, body) = dated(offset_ms);
        refused(&spy.send(&exchange, properties, &body, 1).await, why);
    }
    serves(&node, "sfib", None).await;

    // What an older wasmrpc sent: signed over less, so it could be replayed.
    let mut headers = FieldTable::default();
    headers.insert("x-deploy-name".into(), AMQPValue::LongString("sfib".into()));
    headers.insert(
        "x-deploy-issued-at".into(),
        AMQPValue::LongLongInt(wasmrpc::wire::unix_time().as_secs() as i64),
    );
    let old = BasicProperties::default()
        .with_type("deploy".into())
        .with_headers(headers);
    refused(&spy.send(&exchange, old, &fib, 1).await, "older wasmrpc");

    // Within the clocks' allowed skew, it is taken.
    let (properties, body) = dated(20_000);
    let acks = spy.send(&exchange, properties, &body, 1).await;
    assert!(acks.len() == 1 && acks[0].accepted, "{acks:?}");
    serves(&node, "sfib", Some(&version_of(&fib))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_order_replayed_again_and_again_costs_no_compile_and_calls_go_on() {
    let keys = Keys::new().await;
    let exchange = unique("flood");
    let cache = tempfile::tempdir().unwrap();
    let node = Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_ACCEPT_DEPLOYS", keys.public().to_str().unwrap())
        .env("WASMRPC_CACHE_DIR", cache.path().to_str().unwrap())
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib", "big"]);
    let mut spy = Spy::on(&amqp_url(), &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let big = guests::variant(&fib, &"x".repeat(16 << 20));
    let file = write(dir.path(), "big.wasm", &big);

    let before = node.rss();
    let deployed = deployer(&amqp_url(), &exchange, &keys, &["deploy", &file]).await;
    assert_eq!(
        deployed.code,
        Some(0),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    let order = spy.capture().await;
    let one_deploy = node.peak_rss().saturating_sub(before);
    let peak = node.peak_rss();

    // Callers go on calling while the order comes again and again.
    let client = TestNode::client_for(&exchange).await;
    let calling = tokio_util::sync::CancellationToken::new();
    let caller = tokio::spawn({
        let calling = calling.clone();
        async move {
            let (mut answered, mut slowest) = (0, Duration::ZERO);
            while !calling.is_cancelled() {
                let started = Instant::now();
                let reply = client
                    .call("fib", b"20", Duration::from_secs(10))
                    .await
                    .expect("a call got no reply during the flood");
                assert_eq!(reply.body, b"6765");
                slowest = slowest.max(started.elapsed());
                answered += 1;
            }
            (answered, slowest)
        }
    });
    const REPLAYS: usize = 20;
    for _ in 0..REPLAYS {
        refused(&spy.replay(&exchange, &order, 1).await, "already");
    }
    calling.cancel();
    let (answered, slowest) = caller.await.unwrap();
    let growth = node.peak_rss().saturating_sub(peak);
    println!(
        "one deploy of a {} MiB module: peak +{} MiB; {REPLAYS} replays: peak +{} MiB; \
         {answered} calls meanwhile, the slowest {slowest:?}",
        big.len() >> 20,
        one_deploy >> 20,
        growth >> 20
    );
    assert!(answered > 0);
    // A replay is refused before it is hashed or compiled, and a node holds
    // at most two orders at once (its control prefetch): the whole flood
    // costs no more than the one deploy did, or those two bodies.
    assert!(
        growth <= one_deploy.max(2 * big.len() as u64),
        "{REPLAYS} replays raised the peak by {} MiB",
        growth >> 20
    );
    let mut node = tokio::task::spawn_blocking(move || {
        let log = node.lines_until("refused a deploy", REPLAYS);
        let took = log
            .iter()
            .filter(|line| line.contains("took a signed deploy"))
            .count();
        assert_eq!(took, 1, "{log:#?}");
        node
    })
    .await
    .unwrap();
    assert!(node.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_writes_through_no_planted_link_and_a_failed_write_changes_nothing() {
    let keys = Keys::new().await;
    let exchange = unique("writes");
    let cache = tempfile::tempdir().unwrap();
    // Files the node writes may hold 1 MiB at most (`ulimit -f`).
    let node = Spawn::new(&exchange, &[])
        .env("WASMRPC_ACCEPT_DEPLOYS", keys.public().to_str().unwrap())
        .env("WASMRPC_CACHE_DIR", cache.path().to_str().unwrap())
        .file_size_limit(1 << 20)
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["sfib"]);
    let modules = node.modules_path().to_owned();

    // Links planted where an older wasmrpc wrote aside, pointing outside.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    for planted in [".sfib.wasm.deploy.partial", ".sfib.toml.deploy.partial"] {
        std::os::unix::fs::symlink(&victim, modules.join(planted)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let module = write(dir.path(), "sfib.wasm", &fib);
    let manifest = "content_type = \"text/plain\"\n";
    write(dir.path(), "sfib.toml", manifest);
    let deployed = deployer(&amqp_url(), &exchange, &keys, &["deploy", &module]).await;
    assert_eq!(
        deployed.code,
        Some(0),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let record = std::fs::read(modules.join(".deploys/sfib.json")).unwrap();
    let node = tokio::task::spawn_blocking(move || {
        node.wait_for_line("loaded module");
        node
    })
    .await
    .unwrap();

    // A version too large to write here (2 MiB), with another manifest.
    let larger = write(
        dir.path(),
        "larger.wasm",
        guests::variant(&fib, &"x".repeat(2 << 20)),
    );
    let other = write(
        dir.path(),
        "other.toml",
        "content_type = \"application/json\"\n",
    );
    let deployed = deployer(
        &amqp_url(),
        &exchange,
        &keys,
        &["deploy", &larger, "--name", "sfib", "--manifest", &other],
    )
    .await;
    assert_eq!(
        deployed.code,
        Some(1),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    assert!(
        deployed.stdout.contains("failed to write the module")
            && deployed.stdout.contains("too large"),
        "{}",
        deployed.stdout
    );
    // The previous pair and record exactly as they were; nothing left aside.
    assert_eq!(std::fs::read(modules.join("sfib.wasm")).unwrap(), fib);
    assert_eq!(
        std::fs::read_to_string(modules.join("sfib.toml")).unwrap(),
        manifest
    );
    assert_eq!(
        std::fs::read(modules.join(".deploys/sfib.json")).unwrap(),
        record
    );
    let leftovers: Vec<_> = files_under(&modules)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.contains(".wasmrpc-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And the node serves the old pair on.
    let client = TestNode::client_for(&exchange).await;
    let reply = client
        .call("sfib", b"10", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply.body, b"55");
    assert_eq!(reply.content_type.as_deref(), Some("text/plain"));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_far_over_a_nodes_limit_stays_in_the_broker() {
    let keys = Keys::new().await;
    let exchange = unique("oversized");
    let trusted = keys.trusted();
    let small = TestNode::setup(&[])
        .exchange(&exchange)
        .config(move |config| {
            config.accept_deploys = Some(trusted);
            config.deploy_limit = 1 << 20;
        })
        .start()
        .await;
    let roomy = taker(&exchange, &keys).start().await;
    // A node that takes no deploys drops orders unread, and says nothing.
    let _bystander = TestNode::setup(&[]).exchange(&exchange).start().await;
    let dir = tempfile::tempdir().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();

    // 2 MiB: the roomy node takes it, the small one refuses it with why.
    let medium = guests::variant(&fib, &"x".repeat(2 << 20));
    let file = write(dir.path(), "medium.wasm", &medium);
    let deployed = deployer(&amqp_url(), &exchange, &keys, &["deploy", &file]).await;
    assert_eq!(
        deployed.code,
        Some(1),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    assert!(
        deployed
            .stdout
            .contains("over this node's deploy limit of 1 MiB"),
        "{}",
        deployed.stdout
    );
    assert!(!deployed.stderr.contains("turned"), "{}", deployed.stderr);
    serves(&roomy, "medium", Some(&version_of(&medium))).await;

    // 4 MiB, over twice the small node's limit: the broker keeps it from
    // that node, and the deployer hears so; the roomy node takes it.
    let large = guests::variant(&fib, &"x".repeat(4 << 20));
    let file = write(dir.path(), "large.wasm", &large);
    let deployed = deployer(&amqp_url(), &exchange, &keys, &["deploy", &file]).await;
    assert_eq!(
        deployed.code,
        Some(1),
        "{}{}",
        deployed.stdout,
        deployed.stderr
    );
    assert!(
        deployed
            .stderr
            .contains("turned the deploy away from some node"),
        "{}",
        deployed.stderr
    );
    let line = deployed
        .stdout
        .lines()
        .find(|line| line.starts_with(&small.id))
        .unwrap();
    assert!(
        line.contains("refused") && line.contains("more than twice its deploy limit of 1 MiB"),
        "{}",
        deployed.stdout
    );
    serves(&roomy, "large", Some(&version_of(&large))).await;
    serves(&small, "large", None).await;
}
