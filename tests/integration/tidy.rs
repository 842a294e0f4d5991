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

/// A module's path in the crate (`node/session.rs` is `["node", "session"]`).
fn module_path(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The files each file imports from: every `crate::`, `super::` and
/// `self::` path (and `{a, b}` groups after one), and every path through a
/// child module, resolved to the longest prefix that is a file.
fn imports() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let files = sources();
    let names: std::collections::BTreeSet<&str> =
        files.iter().map(|(path, _)| path.as_str()).collect();
    let resolve = |segments: &[String]| -> Option<String> {
        (0..=segments.len()).rev().find_map(|n| {
            let prefix = segments[..n].join("/");
            let candidates = if n == 0 {
                vec!["lib.rs".to_owned()]
            } else {
                vec![format!("{prefix}.rs"), format!("{prefix}/mod.rs")]
            };
            candidates
                .into_iter()
                .find(|candidate| names.contains(candidate.as_str()))
        })
    };
    let mut graph = std::collections::BTreeMap::new();
    for (path, code) in &files {
        let me = module_path(path);
        let mut found = std::collections::BTreeSet::new();
        let words: Vec<(usize, &str)> = code
            .match_indices(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .scan(0, |start, (at, _)| {
                let word = (*start, &code[*start..at]);
                *start = at + 1;
                Some(word)
            })
            .collect();
        for (at, word) in words {
            let mut segments: Vec<&str> = word.split("::").collect();
            let base: Vec<String> = match segments.first().copied() {
                // `pub(super)` and `pub(in crate::x)` are visibility, not use.
                Some("crate") if !code[..at].ends_with("in ") => Vec::new(),
                Some("super") if !code[..at].ends_with("pub(") => me[..me.len() - 1].to_vec(),
                Some("self") => me.clone(),
                Some(child)
                    if segments.len() > 1
                        && names.contains(
                            format!(
                                "{}.rs",
                                [me.clone(), vec![child.to_owned()]].concat().join("/")
                            )
                            .as_str(),
                        ) =>
                {
                    segments.insert(0, "self");
                    me.clone()
                }
                _ => continue,
            };
            let mut full = base;
            full.extend(
                segments[1..]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string()),
            );
            let mut targets = vec![full.clone()];
            // A group: `super::{Shared, control}`.
            if code[at + word.len()..].starts_with('{') {
                let group = &code[at + word.len() + 1..];
                let group = &group[..group.find('}').unwrap_or(0)];
                for item in group.split(',') {
                    let item = item.trim().split("::").next().unwrap_or_default();
                    if !item.is_empty() && item != "self" {
                        targets.push([full.clone(), vec![item.to_owned()]].concat());
                    }
                }
            }
            for target in targets {
                if let Some(file) = resolve(&target)
                    && file != *path
                {
                    found.insert(file);
                }
            }
        }
        graph.insert(path.clone(), found);
    }
    graph
}

#[test]
fn no_two_files_import_each_other_even_through_others() {
    let graph = imports();
    // The session imports the control queue's file: the checker sees that.
    assert!(
        graph["node/session.rs"].contains("node/control.rs"),
        "{graph:?}"
    );
    let mut cycles = Vec::new();
    for start in graph.keys() {
        // Every file `start` reaches; a cycle if it reaches itself.
        let mut seen = std::collections::BTreeSet::new();
        let mut next: Vec<&String> = graph[start].iter().collect();
        while let Some(file) = next.pop() {
            if seen.insert(file.clone()) {
                next.extend(graph.get(file).into_iter().flatten());
            }
        }
        if seen.contains(start) {
            cycles.push(start.clone());
        }
    }
    assert!(
        cycles.is_empty(),
        "these files reach themselves through their imports: {cycles:?}"
    );
}
