//! What README.md shows works as shown.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{TestNode, amqp_url, guests};

/// The first fenced block of `language` in README.md.
fn readme_block(language: &str) -> String {
    let readme = std::fs::read_to_string(guests::repo().join("README.md")).unwrap();
    let fence = format!("```{language}\n");
    let start = readme
        .find(&fence)
        .unwrap_or_else(|| panic!("README.md has no {language} block"))
        + fence.len();
    let end = start + readme[start..].find("```").expect("an unterminated block");
    readme[start..end].to_owned()
}

/// The README's pika client: a client that knows only the RabbitMQ tutorial.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_python_client_calls_fib() {
    let node = TestNode::start(&["fib"]).await;
    let script = tempfile::NamedTempFile::with_suffix(".py").unwrap();
    std::fs::write(script.path(), readme_block("python")).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());

    let run = |module: &str, argument: &str| {
        let mut command = Command::new(&python);
        command
            .arg(script.path())
            .args([module, argument])
            .env("AMQP_URL", amqp_url())
            .env("WASMRPC_EXCHANGE", node.exchange());
        tokio::task::spawn_blocking(move || command.output().expect("failed to run python3"))
    };
    let output = run("fib", "30").await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'pika'"),
        "the README's client needs pika: python3 -m pip install pika (scripts/test does)"
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "832040\n",
        "stderr: {stderr}"
    );
    assert!(output.status.success());

    let output = run("nosuchmodule", "1").await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error (not_found): no node serves module \"nosuchmodule\"\n"
    );
}

/// A fenced block of README.md.
struct Block {
    language: String,
    /// The line of its opening fence.
    line: usize,
    text: String,
}

fn blocks() -> Vec<Block> {
    let readme = std::fs::read_to_string(guests::repo().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (number, line) in readme.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(language)) => {
                open = Some(Block {
                    language: language.trim().to_owned(),
                    line: number + 1,
                    text: String::new(),
                })
            }
            (Some(_), Some(_)) => blocks.push(open.take().unwrap()),
            (Some(block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// One `$ command` of a console block, and what the README says it prints.
#[derive(Debug)]
struct Example {
    command: String,
    expected: Vec<String>,
    line: usize,
}

fn examples(block: &Block) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    for (offset, line) in block.text.lines().enumerate() {
        match line.strip_prefix("$ ") {
            Some(command) => examples.push(Example {
                command: command.to_owned(),
                expected: Vec::new(),
                line: block.line + 1 + offset,
            }),
            None => examples
                .last_mut()
                .expect("a console block starts with a command")
                .expected
                .push(line.to_owned()),
        }
    }
    examples
}

/// Whether two table cells have the same shape: what differs from one fleet
/// to the next (node ids, hosts, users, uptimes, versions, counts).
fn same_shape(column: &str, expected: &str, actual: &str) -> bool {
    let uuid = |cell: &str| {
        cell.len() == 36
            && cell.chars().enumerate().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    };
    let hex16 = |cell: &str| cell.len() == 16 && cell.chars().all(|c| c.is_ascii_hexdigit());
    let count = |cell: &str| !cell.is_empty() && cell.chars().all(|c| c.is_ascii_digit());
    let ratio = |cell: &str| {
        cell.split_once('/')
            .is_some_and(|(a, b)| count(a) && count(b))
    };
    let uptime = |cell: &str| {
        !cell.is_empty()
            && cell
                .chars()
                .all(|c| c.is_ascii_digit() || "dhms".contains(c))
            && cell.ends_with(['d', 'h', 'm', 's'])
    };
    match column {
        "HOST" | "USER" => !actual.is_empty(),
        _ => {
            let shapes: [&dyn Fn(&str) -> bool; 5] = [&uuid, &hex16, &count, &ratio, &uptime];
            shapes.iter().any(|shape| shape(expected) && shape(actual))
        }
    }
}

/// The cells of a table row, cut where its header's columns start.
fn cells<'a>(header: &str, row: &'a str) -> Vec<(String, &'a str)> {
    let mut starts = Vec::new();
    let mut previous = ' ';
    let mut spaces = 0;
    for (at, c) in header.char_indices() {
        if c != ' ' && (at == 0 || (previous == ' ' && spaces >= 2)) {
            starts.push(at);
        }
        spaces = if c == ' ' { spaces + 1 } else { 0 };
        previous = c;
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &start)| {
            let end = starts.get(i + 1).copied().unwrap_or(header.len());
            let name = header[start..end].trim().to_owned();
            let end = if i + 1 == starts.len() {
                row.len()
            } else {
                end.min(row.len())
            };
            (
                name,
                row.get(start.min(row.len())..end).unwrap_or("").trim(),
            )
        })
        .collect()
}

/// Whether `actual` is what `expected` shows: line for line, `...` for any
/// lines, and in a table (a line starting `NODE`) the cells that vary from
/// fleet to fleet by their shape alone.
fn matches(expected: &[String], actual: &[&str]) -> Result<(), String> {
    let (mut e, mut a) = (0, 0);
    let mut headers: Option<(String, String)> = None;
    while e < expected.len() {
        let want = expected[e].as_str();
        if want == "..." {
            if e + 1 == expected.len() {
                return Ok(());
            }
            // Skip actual lines up to the one the next expected line matches.
            let next = &expected[e + 1];
            while a < actual.len() && actual[a] != next {
                a += 1;
            }
            e += 1;
            continue;
        }
        let Some(&got) = actual.get(a) else {
            return Err(format!("missing: {want:?}"));
        };
        if want.starts_with("NODE ") {
            if want.split_whitespace().ne(got.split_whitespace()) {
                return Err(format!("header {got:?}, not {want:?}"));
            }
            headers = Some((want.to_owned(), got.to_owned()));
        } else if let Some((want_header, got_header)) = &headers {
            let (want_cells, got_cells) = (cells(want_header, want), cells(got_header, got));
            for ((column, want_cell), (_, got_cell)) in want_cells.iter().zip(&got_cells) {
                if want_cell != got_cell && !same_shape(column, want_cell, got_cell) {
                    return Err(format!(
                        "{column} is {got_cell:?}, not {want_cell:?}, in {got:?}"
                    ));
                }
            }
        } else if want != got {
            return Err(format!("{got:?}, not {want:?}"));
        }
        e += 1;
        a += 1;
    }
    match actual.get(a) {
        Some(extra) => Err(format!("more than shown: {extra:?}")),
        None => Ok(()),
    }
}

/// Every `console` block of README.md, run as written against a fleet of
/// two nodes (serving `modules/fib.wasm`, taking deploys signed by
/// `deploy.key`) from a folder laid out as the README assumes: the
/// repository's root after `./guests/build`, with `greet.wasm` to deploy.
#[tokio::test(flavor = "multi_thread")]
async fn every_console_example_in_the_readme_prints_what_it_shows() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let place = |path: &str, from: &std::path::Path| {
        let to = root.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    };
    place("modules/fib.wasm", &guests::repo().join("modules/fib.wasm"));
    place(
        "guests/target/wasm32-wasip2/release/spin.wasm",
        &guests::wasm("spin"),
    );
    place("greet.wasm", &guests::wasm("upcase"));
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_wasmrpc"), bin.join("wasmrpc")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let exchange = crate::support::unique("readme");
    let shell = |command: &str| {
        let mut shell = Command::new("bash");
        shell
            .arg("-c")
            .arg(format!("{command} 2>&1"))
            .current_dir(root)
            .env("PATH", &path)
            .env("AMQP_URL", amqp_url())
            .env("WASMRPC_EXCHANGE", &exchange)
            .env_remove("RUST_LOG")
            .env_remove("WASMRPC_HTTP");
        tokio::task::spawn_blocking(move || shell.output().expect("failed to run bash"))
    };
    let keygen = shell("wasmrpc keygen --out deploy.key").await.unwrap();
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stdout)
    );
    let trusted = wasmrpc::deploy::TrustedKeys::read(&root.join("deploy.key.pub")).unwrap();
    let node = || {
        let trusted = trusted.clone();
        TestNode::setup(&[])
            .file(
                "fib.wasm",
                std::fs::read(root.join("modules/fib.wasm")).unwrap(),
            )
            .exchange(&exchange)
            .config(move |config| config.accept_deploys = Some(trusted))
            .start()
    };
    let _fleet = (node().await, node().await);

    let mut ran = 0;
    for block in blocks().iter().filter(|block| block.language == "console") {
        for example in examples(block) {
            let output = shell(&example.command).await.unwrap();
            let printed = String::from_utf8_lossy(&output.stdout).replace(&exchange, "wasmrpc");
            let lines: Vec<&str> = printed.lines().collect();
            if let Err(why) = matches(&example.expected, &lines) {
                panic!(
                    "README.md line {}: `{}` printed\n{printed}\nwhere the README shows\n{}\n({why})",
                    example.line,
                    example.command,
                    example.expected.join("\n")
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} examples found in README.md");
}

/// The README's recipes for modules in Python, JavaScript and C (the `sh`
/// blocks run "from the repository's root"), run as written in a copy of the
/// parts of the repository they use; each builds a module that runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_recipes_for_other_languages_build_modules_that_run() {
    // Built once by the suite already: no build of these runs meanwhile.
    for module in ["pyfib", "jsstats", "cfib"] {
        guests::lang(module);
    }
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let copy = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "mkdir -p {0}/guests && cp -r wit {0}/ && cp -r guests/python guests/c {0}/guests/ \
             && mkdir {0}/guests/js && cp guests/js/*.js guests/js/package*.json {0}/guests/js/",
            root.display()
        ))
        .current_dir(guests::repo())
        .status()
        .unwrap();
    assert!(copy.success());
    let recipes: Vec<Block> = blocks()
        .into_iter()
        .filter(|block| {
            block.language == "sh" && block.text.starts_with("# from the repository's root")
        })
        .collect();
    assert_eq!(recipes.len(), 3, "the Python, JavaScript and C recipes");
    for recipe in &recipes {
        let mut shell = Command::new("bash");
        shell.arg("-ec").arg(&recipe.text).current_dir(root);
        let output = tokio::task::spawn_blocking(move || shell.output().unwrap())
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "README.md line {}:\n{}\n{}",
            recipe.line,
            recipe.text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for (module, input, reply) in [
        ("pyfib.wasm", "10", "55\n"),
        (
            "jsstats.wasm",
            "[1, 2]",
            "{\"count\":2,\"sum\":3,\"mean\":1.5,\"min\":1,\"max\":2}\n",
        ),
        ("cfib.wasm", "10", "55\n"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmrpc"));
        command
            .args(["run", "--no-cache"])
            .arg(root.join(module))
            .arg(input);
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            reply,
            "{module}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn a_readme_table_matches_by_the_shape_of_what_varies() {
    let expected: Vec<String> = [
        "NODE                                  HOST    UPTIME  MODULES  RUNNING",
        "2933a5a2-fb29-4c9d-b396-af11f65f4f8e  node-a  1h02m   3        1/8",
    ]
    .map(str::to_owned)
    .to_vec();
    let good = [
        "NODE                                  HOST  UPTIME  MODULES  RUNNING",
        "7b826d18-8f7c-4c12-a0ad-5aa58593865e  vm    12s     1        0/4",
    ];
    assert_eq!(matches(&expected, &good), Ok(()));
    let wrong = [
        "NODE                                  HOST  UPTIME  MODULES  RUNNING",
        "7b826d18-8f7c-4c12-a0ad-5aa58593865e  vm    12s     one      0/4",
    ];
    assert!(matches(&expected, &wrong).is_err());
    let more = [good[0], good[1], good[1]];
    assert!(matches(&expected, &more).is_err());
    let mut any = expected.clone();
    any.push("...".into());
    assert_eq!(matches(&any, &more), Ok(()));
}

/// The README's Rust module (`upper`), pasted as written where its
/// `cp wit/...` says, at the repository's root (here, in a folder of the
/// repository's `target/`: inside the workspace all the same), builds with
/// the command it gives into a module that runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_rust_recipe_builds_where_it_says() {
    let blocks = blocks();
    let file = |first_line: &str| {
        blocks
            .iter()
            .find(|block| block.text.starts_with(first_line))
            .unwrap_or_else(|| panic!("README.md has no block starting {first_line:?}"))
            .text
            .clone()
    };
    let root = guests::repo()
        .join("target")
        .join(format!("readme-recipe-{}", uuid::Uuid::new_v4().simple()));
    let upper = root.join("upper");
    std::fs::create_dir_all(upper.join("src")).unwrap();
    std::fs::create_dir_all(upper.join("wit")).unwrap();
    std::fs::write(upper.join("src/lib.rs"), file("// upper/src/lib.rs")).unwrap();
    std::fs::write(upper.join("Cargo.toml"), file("# upper/Cargo.toml")).unwrap();
    std::fs::copy(
        guests::repo().join("wit/wasmrpc.wit"),
        upper.join("wit/wasmrpc.wit"),
    )
    .unwrap();
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&upper)
        .env(
            "CARGO_TARGET_DIR",
            guests::repo().join("guests/target/new-projects"),
        )
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    let built = tokio::task::spawn_blocking(move || build.output().unwrap())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let module = guests::repo().join("guests/target/new-projects/wasm32-wasip2/release/upper.wasm");
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmrpc"));
    command.args(["run", "--no-cache"]).arg(module).arg("hello");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "HELLO\n",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The README's pika client with the change its note gives (publisher
/// confirms), as a broker user allowed only `fib`, calling `sumfib`: told
/// at once, by the broker's refusal, instead of waiting its 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_python_client_with_confirms_is_told_a_refusal_at_once() {
    let broker = crate::support::broker::PrivateBroker::start(&[]).await;
    let exchange = crate::support::unique("refused");
    let mut script = String::from("rabbitmqctl add_user alice secret\n");
    for args in [
        vec!["broker-permissions", "node", "--user", "guest"],
        vec![
            "broker-permissions",
            "caller",
            "--user",
            "alice",
            "--modules",
            "fib",
        ],
    ] {
        let output = crate::cli::run(crate::cli::wasmrpc(&exchange, &args)).await;
        script += &String::from_utf8_lossy(&output.stdout);
    }
    broker.ctl(&script).await;
    let url = broker.url();
    let _node = TestNode::setup(&["fib", "sumfib"])
        .exchange(&exchange)
        .config(move |config| config.brokers = url.parse().unwrap())
        .start()
        .await;
    let client = readme_block("python");
    let line = "channel = connection.channel()\n";
    assert!(
        client.contains(line),
        "the note's anchor line is in the client"
    );
    let client = client.replacen(line, &format!("{line}channel.confirm_delivery()\n"), 1);
    let file = tempfile::NamedTempFile::with_suffix(".py").unwrap();
    std::fs::write(file.path(), client).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    command
        .arg(file.path())
        .args(["sumfib", "1..3"])
        .env("AMQP_URL", broker.url_as("alice", "secret"))
        .env("WASMRPC_EXCHANGE", &exchange);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
