//! The `wasmrpc` binary, as a user runs it.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use crate::support::{TestNode, amqp_url, unique};

pub(crate) fn wasmrpc(exchange: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmrpc"));
    command
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("WASMRPC_EXCHANGE", exchange)
        .env_remove("RUST_LOG");
    command
}

/// Runs `wasmrpc` off the async runtime, so the in-process node keeps serving.
pub(crate) async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("failed to run wasmrpc"))
        .await
        .unwrap()
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn call_prints_the_reply_and_exits_0() {
    let node = TestNode::start(&["fib"]).await;
    let output = run(wasmrpc(node.exchange(), &["call", "fib", "30"])).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        text(&output.stderr)
    );
    assert_eq!(text(&output.stdout), "832040\n");
    assert_eq!(text(&output.stderr), "");

    let raw = run(wasmrpc(node.exchange(), &["call", "--raw", "fib", "10"])).await;
    assert_eq!(text(&raw.stdout), "55");
}

#[tokio::test(flavor = "multi_thread")]
async fn call_reads_the_body_from_stdin_given_a_dash() {
    let node = TestNode::start(&["fib"]).await;
    let mut command = wasmrpc(node.exchange(), &["call", "fib", "-"]);
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"40\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        text(&output.stdout),
        "102334155\n",
        "stderr: {}",
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_reply_goes_to_stderr_with_its_kind_and_exits_1() {
    let node = TestNode::start(&["fib"]).await;
    let output = run(wasmrpc(node.exchange(), &["call", "fib", "abc"])).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("error (bad_request): fib: "), "{stderr}");

    let output = run(wasmrpc(node.exchange(), &["call", "nosuchmodule", "1"])).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "error (not_found): no node serves module \"nosuchmodule\"\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_reply_in_time_says_so_and_exits_3() {
    // A node that has come and gone leaves its queue behind: requests wait
    // there for the next node, and meanwhile nobody answers.
    let mut node = TestNode::start(&["fib"]).await;
    node.stop().await.unwrap();
    let output = run(wasmrpc(
        node.exchange(),
        &["call", "--timeout", "300ms", "fib", "1"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("no reply within 0.3 s"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_cannot_be_reached_is_named_and_exits_4() {
    let mut command = wasmrpc("wasmrpc", &["call", "fib", "1"]);
    command.env("AMQP_URL", "amqp://guest:secret@127.0.0.1:1/%2f");
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(4));
    let stderr = text(&output.stderr);
    assert!(
        stderr
            .starts_with("error: cannot connect to the broker at amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn call_tries_each_broker_of_a_list_in_turn() {
    let node = TestNode::start(&["fib"]).await;
    let mut command = wasmrpc(node.exchange(), &["call", "fib", "20"]);
    command.env("AMQP_URL", format!("amqp://127.0.0.1:1/%2f,{}", amqp_url()));
    let output = run(command).await;
    assert_eq!(
        (output.status.code(), text(&output.stdout)),
        (Some(0), "6765\n".to_owned()),
        "stderr: {}",
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_broker_url_is_refused_at_once_with_exit_2() {
    let modules = tempfile::tempdir().unwrap();
    std::fs::copy(
        crate::support::guests::wasm("fib"),
        modules.path().join("fib.wasm"),
    )
    .unwrap();
    for args in [
        vec!["serve", "--modules", modules.path().to_str().unwrap()],
        vec!["call", "fib", "1"],
    ] {
        let mut command = wasmrpc("wasmrpc", &args);
        command.env("AMQP_URL", "amqp://127.0.0.1:5672/%2f,rabbit:5672");
        let output = run(command).await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("\"rabbit:5672\""), "{stderr}");
        // Refused before any module is compiled.
        assert!(!stderr.contains("loaded"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_the_broker_refuses_for_good_says_why_and_exits_1() {
    let modules = tempfile::tempdir().unwrap();
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_username("wasmrpc-nobody").unwrap();
    url.set_password(Some("wrong")).unwrap();
    let mut command = wasmrpc("wasmrpc", &["serve", "--modules"]);
    command
        .arg(modules.path())
        .env("AMQP_URL", url.as_str())
        .env("RUST_LOG", "off");
    let output = run(command).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: the broker refused this node's configuration: "),
        "{stderr}"
    );
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(
        stderr.contains("wasmrpc-nobody:***@"),
        "the password is hidden: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exchange_no_node_declared_is_named_and_exits_4() {
    let exchange = unique("absent");
    let output = run(wasmrpc(&exchange, &["call", "fib", "1"])).await;
    assert_eq!(output.status.code(), Some(4));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: exchange {exchange:?} does not exist on the broker: no wasmrpc node has run there with this exchange\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn help_documents_the_exit_codes() {
    let output = run(wasmrpc("wasmrpc", &["call", "--help"])).await;
    assert_eq!(output.status.code(), Some(0));
    let help = text(&output.stdout);
    for code in [
        "0 answered",
        "1 error reply",
        "2 bad usage",
        "3 no reply",
        "4 broker",
    ] {
        assert!(
            help.contains(code),
            "`call --help` should explain exit code {code:?}:\n{help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_and_modules_list_the_live_nodes_and_what_they_serve() {
    use wasmrpc::wire::NodeStatus;

    let exchange = unique("fleet");
    let first = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    let mut second = TestNode::setup(&["fib", "spin"])
        .exchange(&exchange)
        .start()
        .await;
    for n in ["1", "2", "3"] {
        assert_eq!(first.call("fib", n).await.error, None);
    }
    crate::support::node::answered(&[&first, &second], 3).await;

    let output = run(wasmrpc(&exchange, &["ping", "--wait", "500ms"])).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        text(&output.stderr)
    );
    let listing = text(&output.stdout);
    assert!(listing.starts_with("NODE "), "{listing}");
    assert!(
        listing.contains(&first.id) && listing.contains(&second.id),
        "{listing}"
    );

    let output = run(wasmrpc(
        &exchange,
        &["modules", "--json", "--wait", "500ms"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0));
    let nodes: Vec<NodeStatus> = serde_json::from_slice(&output.stdout).unwrap();
    let mut ids: Vec<&str> = nodes.iter().map(|node| node.node.as_str()).collect();
    ids.sort();
    let mut expected = vec![first.id.as_str(), second.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let version = |module: &str| {
        let wasm = std::fs::read(crate::support::guests::wasm(module)).unwrap();
        wasmrpc::runtime::Wasm::new(wasm).digest()[..16].to_owned()
    };
    let mut fib_calls = 0;
    for node in &nodes {
        let served: Vec<(&str, &str)> = node
            .modules
            .iter()
            .map(|m| (m.name.as_str(), m.version.as_str()))
            .collect();
        let fib = version("fib");
        let spin = version("spin");
        if node.node == first.id {
            assert_eq!(served, [("fib", fib.as_str())]);
        } else {
            assert_eq!(served, [("fib", fib.as_str()), ("spin", spin.as_str())]);
        }
        fib_calls += node.modules[0].calls;
        assert!(node.uptime_ms < 60_000 && !node.host.is_empty());
        // Named as the flags name them: --concurrency, and 4 times as many
        // instances.
        let concurrency = wasmrpc::node::default_concurrency();
        assert_eq!(
            (node.concurrency, node.instances),
            (concurrency, 4 * concurrency)
        );
        assert!(!node.accepts() && node.deploy_limit.is_none());
    }
    assert_eq!(
        fib_calls, 3,
        "the three calls are counted once, on the node that answered"
    );

    let output = run(wasmrpc(&exchange, &["modules", "--wait", "500ms"])).await;
    assert!(
        text(&output.stdout).contains("spin"),
        "{}",
        text(&output.stdout)
    );

    // A node that is gone does not answer.
    second.stop().await.unwrap();
    let output = run(wasmrpc(&exchange, &["ping", "--wait", "500ms"])).await;
    let listing = text(&output.stdout);
    assert!(
        listing.contains(&first.id) && !listing.contains(&second.id),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_with_no_live_node_says_so_and_exits_3() {
    let mut node = TestNode::start(&["fib"]).await;
    node.stop().await.unwrap();
    let output = run(wasmrpc(node.exchange(), &["ping", "--wait", "300ms"])).await;
    assert_eq!(output.status.code(), Some(3));
    assert!(
        text(&output.stderr).starts_with("error: no node answered within 0.3 s"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_wasmrpc()"),
        ("zsh", "#compdef wasmrpc"),
        ("fish", "complete -c wasmrpc"),
    ] {
        let output = run(wasmrpc("unused", &["completions", shell])).await;
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        let script = text(&output.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        for subcommand in ["serve", "call", "run", "health"] {
            assert!(
                script.contains(subcommand),
                "{shell} completes no {subcommand}"
            );
        }
    }
    let output = run(wasmrpc("unused", &["completions", "tcsh"])).await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_end_quietly_when_the_reader_stops_early() {
    // As `wasmrpc completions bash | head -3`, with the reader gone before
    // the first write: every write fails with a broken pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut command = wasmrpc("unused", &["completions", "bash"]);
    command.stdout(writer);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stderr), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_without_its_modules_directory_says_how_to_fix_it() {
    let missing = tempfile::tempdir().unwrap().path().join("modules");
    let output = run(wasmrpc(
        &unique("nodir"),
        &["serve", "--modules", missing.to_str().unwrap()],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("does not exist")
            && stderr.contains(&format!("mkdir -p {}", missing.display())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn help_gives_each_subcommand_its_own_line_and_the_usual_short_flags() {
    let output = run(wasmrpc("unused", &["--help"])).await;
    let help = text(&output.stdout);
    let line = |command: &str| {
        help.lines()
            .find(|line| line.trim_start().starts_with(&format!("{command} ")))
            .unwrap_or_else(|| panic!("no {command} in\n{help}"))
            .split_once(command)
            .unwrap()
            .1
            .trim()
            .to_owned()
    };
    assert_ne!(line("ping"), line("modules"), "{help}");
    let bench = text(&run(wasmrpc("unused", &["bench", "--help"])).await.stdout);
    for flag in ["-n, --requests", "-c, --concurrency", "-d, --duration"] {
        assert!(bench.contains(flag), "{flag} in\n{bench}");
    }
}
