//! The invariants of ARCHITECTURE.md that a reading of `host/src` can
//! check: each test fails, naming the file, when a rule breaks.

use std::path::{Path, PathBuf};

/// Every source file under `host/src`, relative to it, with its code: test
/// modules (from `#[cfg(test)]` on) and comment lines left out.
fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path: PathBuf = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let code: String = code
                    .lines()
                    .filter(|line| !line.trim_start().starts_with("//"))
                    .map(|line| format!("{line}\n"))
                    .collect();
                let relative = path.strip_prefix(&root).unwrap();
                files.push((relative.to_string_lossy().into_owned(), code));
            }
        }
    }
    files.sort();
    assert!(files.len() > 30, "host/src not found: {files:?}");
    files
}

/// The files (outside `allowed`) whose code holds any of `needles`.
fn offenders(needles: &[&str], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|(path, _)| !allowed(path))
        .filter_map(|(path, code)| {
            let found: Vec<&str> = needles
                .iter()
                .copied()
                .filter(|needle| code.contains(needle))
                .collect();
            (!found.is_empty()).then(|| format!("{path}: {found:?}"))
        })
        .collect()
}

#[test]
fn the_runtime_knows_nothing_of_amqp() {
    let found = offenders(&["lapin", "amqp", "wire::"], |path| {
        !path.starts_with("runtime/")
    });
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn in_the_node_only_the_settler_acks_nacks_or_rejects() {
    // `wasmrpc dead` settles the letters it reads on its own channel.
    let found = offenders(
        &[
            "basic_ack",
            "basic_nack",
            "basic_reject",
            ".ack(",
            ".nack(",
            ".reject(",
            "Acker",
        ],
        |path| path == "settler.rs" || path == "cli/dead.rs",
    );
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn only_the_cli_reads_the_environment_or_ends_the_process() {
    let found = offenders(
        &[
            "env::var",
            "env::args",
            "std::env",
            "process::exit",
            "process::abort",
        ],
        |path| path.starts_with("cli/"),
    );
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn compiled_code_is_loaded_in_one_place() {
    let places: Vec<String> = sources()
        .into_iter()
        .flat_map(|(path, code)| {
            let count = ["Component::deserialize", "Module::deserialize"]
                .iter()
                .map(|needle| code.matches(needle).count())
                .sum();
            std::iter::repeat_n(path, count)
        })
        .collect();
    assert_eq!(places, ["runtime/mod.rs"], "Component::deserialize");
}

#[test]
fn a_request_task_sees_nothing_of_the_node() {
    let found = offenders(&["crate::node", "super::node"], |path| {
        !matches!(
            path,
            "request.rs" | "settler.rs" | "replies.rs" | "wire/request.rs" | "wire/reply.rs"
        )
    });
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn only_the_runtime_configures_wasmtime() {
    let found = offenders(
        &[
            "Engine::new",
            "Linker::new",
            "Store::new",
            "wasmtime::Config",
        ],
        |path| path.starts_with("runtime/"),
    );
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn the_http_endpoint_only_reads_through_a_probe() {
    let found = offenders(&["Shared", "Registry", "Loader", "Metrics::"], |path| {
        path != "http.rs"
    });
    assert!(found.is_empty(), "{found:?}");
    // And the node knows nothing of HTTP.
    let found = offenders(&["crate::http", "axum", "hyper"], |path| {
        !(path.starts_with("node/") || path == "request.rs")
    });
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_type_name_means_one_thing_in_the_crate() {
    let mut seen: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (path, code) in sources() {
        for line in code.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(at) = words
                .iter()
                .position(|word| matches!(*word, "struct" | "enum" | "trait"))
            else {
                continue;
            };
            // `pub(crate) struct Name<T> {`, not `impl Trait for X` nor a string.
            if words[..at].iter().any(|word| !word.starts_with("pub")) {
                continue;
            }
            if let Some(name) = words.get(at + 1) {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                seen.entry(name).or_default().push(path.clone());
            }
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, paths)| paths.len() > 1).collect();
    assert!(twice.is_empty(), "{twice:?}");
}
