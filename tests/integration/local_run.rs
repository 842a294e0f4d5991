//! `wasmrpc run`: a module run once on this machine, with no broker, gives
//! what a node would answer.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::cli::text;
use crate::fuzz::{MODULES, random_body};
use crate::support::TestNode;
use crate::support::node::REPLY_TIMEOUT;

/// `wasmrpc run FILE -` with `input` on stdin: its exit code, stdout, stderr.
async fn run_locally(
    file: std::path::PathBuf,
    cache: std::path::PathBuf,
    input: Vec<u8>,
) -> (i32, Vec<u8>, String) {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
            .args(["run", "--raw", "--cache-dir"])
            .arg(&cache)
            .arg(&file)
            .arg("-")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // A module may fail before it reads everything: a closed pipe is fine.
        let _ = stdin.write_all(&input);
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            output.stdout,
            text(&output.stderr),
        )
    })
    .await
    .unwrap()
}

/// The error kind `run` printed (`error (KIND): ...`), or `ok`.
fn outcome(code: i32, stderr: &str) -> String {
    match code {
        0 => "ok".to_owned(),
        1 => stderr
            .strip_prefix("error (")
            .and_then(|rest| rest.split_once(')'))
            .map(|(kind, _)| kind.to_owned())
            .unwrap_or_else(|| panic!("exit 1 without an error kind: {stderr}")),
        code => panic!("run exited {code}: {stderr}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_and_a_node_agree_on_every_input_of_the_fuzz_corpus() {
    let seed = fastrand::u64(..);
    println!("run vs call: seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    // The node and `run` read the same files, manifest included.
    let node = TestNode::setup(&MODULES)
        .manifest("spin", "[limits]\ntime = \"100ms\"\n")
        .start()
        .await;
    let client = node.client().await;
    let cache = tempfile::tempdir().unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let module = MODULES[rng.usize(..MODULES.len())];
        let input = random_body(&mut rng);
        // Around its time limit, spin's outcome is the machine's load.
        let spins_ms = std::str::from_utf8(&input)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        if module == "spin" && spins_ms.is_some_and(|ms| (50..=300).contains(&ms)) {
            continue;
        }
        let file = node.modules_path().join(format!("{module}.wasm"));
        let (code, stdout, stderr) =
            run_locally(file, cache.path().to_owned(), input.clone()).await;
        let local = outcome(code, &stderr);
        let reply = client
            .call(module, &input, REPLY_TIMEOUT)
            .await
            .expect("the node answers");
        let remote = reply.error.clone().unwrap_or_else(|| "ok".to_owned());
        let shown = String::from_utf8_lossy(&input[..input.len().min(40)]).into_owned();
        assert_eq!(
            local, remote,
            "{module} {shown:?} (seed {seed}): run said {stderr}"
        );
        if remote == "ok" {
            assert_eq!(stdout, reply.body, "{module} {shown:?} (seed {seed})");
        }
        kinds.insert(remote);
    }
    println!("outcomes seen: {kinds:?}");
    assert!(
        kinds.len() >= 3,
        "a corpus this narrow proves little: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_takes_the_limit_flags_and_refuses_what_is_not_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let spin = dir.path().join("spin.wasm");
    std::fs::copy(crate::support::guests::wasm("spin"), &spin).unwrap();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
                .arg("run")
                .arg("--no-cache")
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .unwrap()
        })
    };
    let spin = spin.display().to_string();
    let quick = run(vec![spin.clone(), "20".into()]).await.unwrap();
    assert_eq!(quick.status.code(), Some(0), "{}", text(&quick.stderr));
    assert_eq!(text(&quick.stdout), "spun for 20 ms\n");

    let limited = run(vec![
        "--time-limit".into(),
        "50ms".into(),
        spin,
        "2000".into(),
    ])
    .await
    .unwrap();
    assert_eq!(limited.status.code(), Some(1));
    assert!(
        text(&limited.stderr)
            .starts_with("error (timeout): spin: ran longer than its time limit of 50 ms"),
        "{}",
        text(&limited.stderr)
    );

    let not_wasm = dir.path().join("junk.wasm");
    std::fs::write(&not_wasm, b"not wasm").unwrap();
    for file in [not_wasm, dir.path().join("missing.wasm")] {
        let output = run(vec![file.display().to_string()]).await.unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
        assert!(
            text(&output.stderr).starts_with("error: "),
            "{}",
            text(&output.stderr)
        );
    }
}

/// `wasmrpc run FILE --modules DIR ARG`: exit code, stdout, stderr.
fn run_with_modules(
    file: &std::path::Path,
    dir: &std::path::Path,
    arg: &str,
) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
        .arg("run")
        .arg(file)
        .arg("--modules")
        .arg(dir)
        .arg(arg)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        text(&output.stdout),
        text(&output.stderr),
    )
}

#[test]
fn run_resolves_calls_to_other_modules_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |guest: &str, name: &str, manifest: Option<&str>| {
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::copy(crate::support::guests::wasm(guest), &path).unwrap();
        if let Some(manifest) = manifest {
            std::fs::write(dir.path().join(format!("{name}.toml")), manifest).unwrap();
        }
        path
    };
    copy("fib", "fib", None);
    let sumfib = copy("sumfib", "sumfib", Some("calls = [\"fib\"]\n"));
    let relay = copy("relay", "a", Some("calls = [\"*\"]\n"));

    let (code, stdout, stderr) = run_with_modules(&sumfib, dir.path(), "1..30");
    assert_eq!((code, stdout.trim()), (0, "2178308"), "{stderr}");

    // The same depth limit as a node's: a module calling itself ends.
    let (code, _, stderr) = run_with_modules(&relay, dir.path(), "a,a,a,a,a,a,a;1");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("too_deep: a call to \"a\" would be 5 deep"),
        "{stderr}"
    );

    // A module the directory does not hold is not found, as on a fleet.
    let (code, _, stderr) = run_with_modules(&relay, dir.path(), "nobody;1");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nobody: not_found: "), "{stderr}");

    // Without a manifest naming its callees, a calling module does not run.
    std::fs::remove_file(dir.path().join("sumfib.toml")).unwrap();
    let (code, _, stderr) = run_with_modules(&sumfib, dir.path(), "1..3");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("names no module it may call"), "{stderr}");
}
