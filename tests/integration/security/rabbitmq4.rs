//! RabbitMQ 4.3 denies by default two features it deprecated: global QoS
//! (`basic.qos` with `global`) and transient queues that are not exclusive.
//! No RabbitMQ 4 installs here, so this reads the node's source: every
//! prefetch is per consumer, and every queue it declares is durable,
//! exclusive, or only looked up (passive).

use std::path::Path;

use crate::support::guests::repo;

/// Every Rust file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    found
}

/// The text of each struct literal `Name { ... }` in `text`.
fn literals<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let opening = format!("{name} {{");
    text.match_indices(&opening)
        .map(|(start, _)| {
            let body = &text[start + opening.len()..];
            let mut depth = 1;
            let end = body
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(body.len(), |(end, _)| end);
            &body[..end]
        })
        .collect()
}

#[test]
fn the_node_uses_nothing_rabbitmq_4_3_denies() {
    let sources = sources(&repo().join("host/src"));
    let mut declarations = 0;
    for (path, text) in &sources {
        assert!(
            !text.contains("global: true"),
            "{path} asks for global QoS, which RabbitMQ 4.3 refuses"
        );
        // Default options alone declare a transient, shared queue.
        let defaults = text.matches("QueueDeclareOptions::default()").count();
        let updates = text.matches("..QueueDeclareOptions::default()").count();
        assert_eq!(
            defaults, updates,
            "{path} declares a queue with default options: transient and not exclusive"
        );
        for literal in literals(text, "QueueDeclareOptions") {
            declarations += 1;
            assert!(
                ["durable: true", "exclusive: true", "passive: true"]
                    .iter()
                    .any(|option| literal.contains(option)),
                "{path} declares a transient queue that is not exclusive, which RabbitMQ 4.3 \
                 refuses: QueueDeclareOptions {{{literal}}}"
            );
        }
    }
    // The check saw the node's declarations (module, shared, control queues).
    assert!(declarations >= 3, "found {declarations} queue declarations");
}
