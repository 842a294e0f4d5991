//! What README.md shows works as shown.

use std::process::Command;

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
