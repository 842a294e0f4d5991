//! What each wasmrpc role may do on a broker shared by teams, as RabbitMQ
//! permissions: a regular expression per user and vhost for each of
//! configure, write and read, matched against exchange and queue names, and
//! topic permissions on the requests exchange, matched against routing keys
//! (which name modules). `wasmrpc broker-permissions` prints them as
//! `rabbitmqctl` lines, because hand-written regexes are where this goes
//! wrong.
//!
//! - A **node** declares the fleet's topology, consumes the module, unrouted
//!   and control queues, publishes replies (through the default exchange,
//!   to whatever `reply_to` names), publishes again a request that came
//!   before its module's queue was bound, and publishes the calls its
//!   modules make to other modules (both to the requests exchange, any
//!   routing key: a module's manifest says what it may call), with their
//!   replies by direct reply-to.
//! - A **caller** publishes requests for the modules it is given, and may
//!   keep an exclusive reply queue of its own (the tutorial's) or use direct
//!   reply-to. It can consume no module queue, and publish nothing to the
//!   control exchange.
//! - A **deployer** publishes to the control exchange (deploy orders, and the
//!   fleet questions of `ping` and `modules`) and reads the answers through
//!   direct reply-to.
//!
//! What RabbitMQ checks for each operation (its access-control guide):
//! declaring an exchange needs configure on it, and with an alternate
//! exchange also write on that and read on the exchange; declaring a queue
//! needs configure on it, and with a dead-letter exchange also write on that
//! and read on the queue; binding needs write on the queue and read on the
//! exchange; consuming needs read on the queue; publishing needs write on the
//! exchange (`amq.default` for the default one) and, on a topic exchange,
//! topic write on the routing key. Server-named queues are `amq.gen-...`.

use std::fmt::Write as _;

use crate::names::ModuleName;
use crate::wire::Topology;

/// What a broker user does in a fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Node,
    /// Calls these modules; `None` for every module.
    Caller(Option<Vec<ModuleName>>),
    Deployer,
}

/// One user's permissions on one vhost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub vhost: String,
    pub user: String,
    pub configure: String,
    pub write: String,
    pub read: String,
    /// Topic permissions: on this exchange, write and read regexes over
    /// routing keys.
    pub topic: Option<(String, String, String)>,
}

/// Matches nothing but the empty name, which no resource has.
const NOTHING: &str = "^$";

/// The permissions of `role` for `user` in the fleet on `topology`'s
/// exchange, in `vhost`.
pub fn grant(role: &Role, topology: &Topology, user: &str, vhost: &str) -> Grant {
    let exchange = escape(topology.exchange());
    // Each name a node declares, as a regex.
    let requests = exchange.clone();
    let unrouted = format!(r"{exchange}\.unrouted");
    let dead = format!(r"{exchange}\.dead");
    let control = format!(r"{exchange}\.control");
    let modules = format!(r"{exchange}\.module\..+");
    let server_named = r"amq\.gen-.+".to_owned();
    let any = |names: &[&str]| format!("^({})$", names.join("|"));
    let (configure, write, read, topic) = match role {
        Role::Node => (
            any(&[
                &requests,
                &unrouted,
                &dead,
                &control,
                &modules,
                &server_named,
            ]),
            // Alternate and dead-letter exchanges, the queues it binds,
            // replies, forwarded requests.
            any(&[
                &requests,
                &unrouted,
                &dead,
                &modules,
                &server_named,
                r"amq\.default",
            ]),
            any(&[
                &requests,
                &unrouted,
                &dead,
                &control,
                &modules,
                &server_named,
            ]),
            None,
        ),
        Role::Caller(allowed) => {
            let keys = match allowed {
                None => ".*".to_owned(),
                Some(names) => any(&names.iter().map(ModuleName::as_str).collect::<Vec<_>>()),
            };
            (
                any(&[&server_named]),
                any(&[&requests]),
                any(&[&server_named]),
                Some((topology.exchange().to_owned(), keys, NOTHING.to_owned())),
            )
        }
        Role::Deployer => (
            NOTHING.to_owned(),
            any(&[&control]),
            NOTHING.to_owned(),
            None,
        ),
    };
    Grant {
        vhost: vhost.to_owned(),
        user: user.to_owned(),
        configure,
        write,
        read,
        topic,
    }
}

impl Grant {
    /// The `rabbitmqctl` commands that set these permissions, one a line.
    pub fn rabbitmqctl(&self) -> String {
        let mut lines = format!(
            "rabbitmqctl set_permissions -p {} {} {} {} {}\n",
            quote(&self.vhost),
            quote(&self.user),
            quote(&self.configure),
            quote(&self.write),
            quote(&self.read),
        );
        if let Some((exchange, write, read)) = &self.topic {
            let _ = writeln!(
                lines,
                "rabbitmqctl set_topic_permissions -p {} {} {} {} {}",
                quote(&self.vhost),
                quote(&self.user),
                quote(exchange),
                quote(write),
                quote(read),
            );
        }
        lines
    }
}

/// `text` as a regex that matches it literally.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.^$|?*+()[]{}".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// `text` as one word for a POSIX shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `regex` (of the simple shape [`grant`] makes) matches `name`,
    /// as RabbitMQ would: only alternatives of literals, `.+` and `.*`.
    fn matches(regex: &str, name: &str) -> bool {
        if regex == NOTHING {
            return name.is_empty();
        }
        if regex == ".*" {
            return true;
        }
        let inner = regex
            .strip_prefix("^(")
            .and_then(|rest| rest.strip_suffix(")$"))
            .unwrap_or_else(|| panic!("unexpected regex {regex}"));
        inner.split('|').any(|alternative| {
            let literal = alternative.replace(r"\.", ".");
            match literal.strip_suffix(".+") {
                Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix),
                None => name == literal,
            }
        })
    }

    fn fleet() -> Topology {
        Topology::new("team-a.rpc")
    }

    #[test]
    fn a_node_reaches_its_fleet_and_nothing_else() {
        let topology = fleet();
        let node = grant(&Role::Node, &topology, "node", "/");
        let fib = topology.module_queue(&"fib".parse().unwrap());
        for name in [
            topology.exchange(),
            &topology.unrouted_queue(),
            &topology.dead_queue(),
            &topology.control_exchange(),
            &fib,
            "amq.gen-Xa2",
        ] {
            assert!(matches(&node.configure, name), "configure {name}");
            assert!(matches(&node.read, name), "read {name}");
        }
        assert!(matches(&node.write, "amq.default"));
        assert!(matches(&node.write, &fib));
        assert!(matches(&node.write, topology.exchange()));
        // It touches no other fleet, nor the control exchange but to bind.
        assert!(!matches(&node.write, &topology.control_exchange()));
        let other = Topology::new("team-b.rpc");
        for name in [other.exchange(), &other.control_exchange(), "team-aXrpc"] {
            assert!(!matches(&node.configure, name), "{name}");
            assert!(!matches(&node.read, name), "{name}");
        }
    }

    #[test]
    fn a_caller_publishes_requests_for_its_modules_only() {
        let topology = fleet();
        let modules = vec!["fib".parse().unwrap(), "sum".parse().unwrap()];
        let caller = grant(&Role::Caller(Some(modules)), &topology, "alice", "/");
        assert!(matches(&caller.write, topology.exchange()));
        assert!(!matches(&caller.write, &topology.control_exchange()));
        assert!(!matches(&caller.write, "amq.default"));
        let fib = topology.module_queue(&"fib".parse().unwrap());
        assert!(!matches(&caller.read, &fib));
        assert!(matches(&caller.read, "amq.gen-Xa2"));
        let (exchange, keys, _) = caller.topic.clone().unwrap();
        assert_eq!(exchange, "team-a.rpc");
        assert!(matches(&keys, "fib") && matches(&keys, "sum"));
        assert!(!matches(&keys, "fibx") && !matches(&keys, "nap"));

        let anyone = grant(&Role::Caller(None), &topology, "bob", "/");
        assert_eq!(anyone.topic.unwrap().1, ".*");
    }

    #[test]
    fn a_deployer_publishes_to_the_control_exchange_only() {
        let topology = fleet();
        let deployer = grant(&Role::Deployer, &topology, "ci", "/");
        assert!(matches(&deployer.write, &topology.control_exchange()));
        assert!(!matches(&deployer.write, topology.exchange()));
        assert_eq!(
            (deployer.configure.as_str(), deployer.read.as_str()),
            (NOTHING, NOTHING)
        );
    }

    #[test]
    fn the_lines_quote_every_word() {
        let caller = grant(
            &Role::Caller(Some(vec!["fib".parse().unwrap()])),
            &Topology::new("wasmrpc"),
            "o'brien",
            "/",
        );
        assert_eq!(
            caller.rabbitmqctl(),
            "rabbitmqctl set_permissions -p '/' 'o'\\''brien' '^(amq\\.gen-.+)$' '^(wasmrpc)$' '^(amq\\.gen-.+)$'\n\
             rabbitmqctl set_topic_permissions -p '/' 'o'\\''brien' 'wasmrpc' '^(fib)$' '^$'\n"
        );
    }
}
