//! Which `reply_to` a node answers to. The caller names it, so it crosses a
//! trust boundary as the body does, and is checked before anything is
//! published to it.
//!
//! A reply goes through the default exchange to the queue its `reply_to`
//! names. Three kinds of name are refused without publishing anything:
//!
//! - one of the fleet's own queues: the exchange's name or any name under it
//!   (`EXCHANGE.module.fib`, `EXCHANGE.unrouted`, `EXCHANGE.dead`...), which
//!   replies would fill with messages no node expects (the dead-letter
//!   queue's cap would then drop real poison letters);
//! - one that the operator's patterns (`--reply-to`) do not allow;
//! - a direct reply-to name (`amq.rabbitmq.reply-to.PID.KEY`) that the broker
//!   cannot have made: RabbitMQ 3.x answers a reply to one by closing the
//!   publisher's whole connection (541), and every reply in flight with it.
//!
//! A direct reply-to name that is well formed names the broker node its
//! consumer is on (from RabbitMQ 3.10, `reply@` and a hash of the node's
//! name, in an Erlang pid). RabbitMQ still closes the connection over a name
//! whose node it does not know; [`Nodes`] keeps which broker nodes replies
//! have reached, and which the broker refused lately. The reply path sends
//! a reply to any other node *on trial*: alone, on a connection of its own,
//! so that the broker closing that connection costs only this reply.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The prefix of the names RabbitMQ gives direct reply-to consumers.
const DIRECT_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Where a reply is published, by its `reply_to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A queue's name: the broker drops a reply to a queue that does not
    /// exist, and refuses nothing.
    Queue,
    /// A direct reply-to consumer on the broker node this names.
    Direct(BrokerNode),
}

/// A broker node as a direct reply-to name names it: the node atom of the
/// pid it carries (`reply@9248884`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrokerNode(Vec<u8>);

/// Why a `reply_to` is refused before anything is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadReplyTo {
    /// It names a queue of the fleet itself.
    FleetQueue,
    /// The operator's patterns do not allow it.
    NotAllowed,
    /// A direct reply-to name the broker cannot have made.
    Malformed,
    /// A direct reply-to name for a broker node no reply has reached, past
    /// the few such names a node tries a second.
    Unproven,
}

impl BadReplyTo {
    /// As the `reason` label of `wasmrpc_replies_refused_total` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            BadReplyTo::FleetQueue => "fleet_queue",
            BadReplyTo::NotAllowed => "not_allowed",
            BadReplyTo::Malformed => "malformed",
            BadReplyTo::Unproven => "unproven",
        }
    }
}

impl std::fmt::Display for BadReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadReplyTo::FleetQueue => "reply_to names a queue of the fleet itself",
            BadReplyTo::NotAllowed => "reply_to is not one this node's --reply-to patterns allow",
            BadReplyTo::Malformed => {
                "reply_to is not a direct reply-to name the broker can have made"
            }
            BadReplyTo::Unproven => {
                "reply_to names a broker node no reply has reached yet, and more such names came \
                 this second than the node tries"
            }
        })
    }
}

/// A pattern a `reply_to` must match: `*` stands for any run of characters
/// (none included), every other character for itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        if text.is_empty() || text.len() > 255 {
            return Err(format!(
                "{text:?} is not a reply_to pattern: 1 to 255 characters"
            ));
        }
        Ok(Pattern(text.to_owned()))
    }

    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            // No `*`: the whole name.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node checks every `reply_to` against.
#[derive(Clone, Debug)]
pub struct ReplyRules {
    /// The fleet's exchange: its queues are named under it.
    exchange: String,
    /// Empty: any name that is not refused for another reason.
    allow: Vec<Pattern>,
}

impl ReplyRules {
    /// The patterns RabbitMQ's tutorials and common clients need: direct
    /// reply-to and the server-named queues a client declares for replies.
    pub const TUTORIAL: &'static str = "amq.rabbitmq.reply-to.*,amq.gen-*";

    pub fn new(exchange: &str, allow: Vec<Pattern>) -> ReplyRules {
        ReplyRules {
            exchange: exchange.to_owned(),
            allow,
        }
    }

    /// Where a reply to `reply_to` goes, or why it goes nowhere.
    pub fn check(&self, reply_to: &str) -> Result<Route, BadReplyTo> {
        let fleet = reply_to
            .strip_prefix(self.exchange.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if fleet {
            return Err(BadReplyTo::FleetQueue);
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| p.matches(reply_to)) {
            return Err(BadReplyTo::NotAllowed);
        }
        match reply_to.strip_prefix(DIRECT_PREFIX) {
            None => Ok(Route::Queue),
            Some(suffix) => direct_node(suffix)
                .map(Route::Direct)
                .ok_or(BadReplyTo::Malformed),
        }
    }
}

/// The broker node a direct reply-to name's suffix (`PID.KEY`) names, if
/// the broker can have made it: `PID` is the base64 of an Erlang pid in the
/// external term format, and nothing else (RabbitMQ splits at the first `.`).
fn direct_node(suffix: &str) -> Option<BrokerNode> {
    let (pid, _key) = suffix.split_once('.')?;
    let term = base64::engine::general_purpose::STANDARD.decode(pid).ok()?;
    pid_node(&term).map(|node| BrokerNode(node.to_vec()))
}

/// The node atom of an Erlang pid in the external term format, if `term`
/// is exactly one: version 131, then `NEW_PID_EXT` (88: node, then ID,
/// serial and creation in 4 bytes each) or `PID_EXT` (103: creation in 1).
fn pid_node(term: &[u8]) -> Option<&[u8]> {
    let [131, tag, rest @ ..] = term else {
        return None;
    };
    let tail = match tag {
        88 => 12,
        103 => 9,
        _ => return None,
    };
    let (node, rest) = atom(rest)?;
    (rest.len() == tail && !node.is_empty()).then_some(node)
}

/// An atom's text and what follows it: `ATOM_UTF8_EXT` (118) and
/// `ATOM_EXT` (100) with a 2-byte length, their `SMALL_` forms (119, 115)
/// with a 1-byte one.
fn atom(term: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = match term {
        [118 | 100, high, low, rest @ ..] => (usize::from(u16::from_be_bytes([*high, *low])), rest),
        [119 | 115, length, rest @ ..] => (usize::from(*length), rest),
        _ => return None,
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

/// How many replies to broker nodes no reply has reached a node tries a
/// second, and at once: each one RabbitMQ refuses costs the broker a
/// connection (and an error report in its log), which costs every caller.
const TRIALS_PER_SECOND: f64 = 2.0;
const TRIALS_AT_ONCE: f64 = 5.0;

/// When a reply may go out on trial: a token bucket.
#[derive(Debug)]
pub struct Trials {
    tokens: f64,
    last: Instant,
}

impl Default for Trials {
    fn default() -> Trials {
        Trials {
            tokens: TRIALS_AT_ONCE,
            last: Instant::now(),
        }
    }
}

impl Trials {
    /// Whether one more reply may go out on trial now.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * TRIALS_PER_SECOND;
        self.tokens = (self.tokens + earned).min(TRIALS_AT_ONCE);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// How long a broker node stays refused after the broker refused a reply to
/// it: a node hash no broker knows now may be one that joins the cluster.
const REFUSED_FOR: Duration = Duration::from_secs(60);

/// The most broker nodes [`Nodes`] keeps of each kind: clusters have a few;
/// names an attacker makes up are forgotten, oldest first.
const MAX_KNOWN: usize = 64;
const MAX_REFUSED: usize = 1024;

/// What the reply path knows of the broker nodes direct reply-to names name.
#[derive(Debug, Default)]
pub struct Nodes {
    /// Nodes that replies reached: the broker confirmed one.
    known: VecDeque<BrokerNode>,
    /// Nodes over which the broker refused a reply, and when.
    refused: VecDeque<(BrokerNode, Instant)>,
    /// Nodes a reply is on trial for now (or waits to be): the replies to
    /// them that come meanwhile wait for its outcome, and take no trial.
    trying: Vec<BrokerNode>,
    trials: Trials,
}

/// What a reply to a broker node may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clearance {
    /// Go out with the others: a reply reached the node.
    Known,
    /// Nothing: the broker refused a reply to it moments ago.
    Refused,
    /// Go out on trial, in its turn.
    Trial,
    /// Nothing: no reply reached it, and the node tried as many such names
    /// as it may for now.
    Unproven,
}

/// Where a broker node stands with the reply path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A reply reached it: replies to it go out with the others.
    Known,
    /// The broker refused a reply to it moments ago.
    Refused,
    /// Neither: a reply to it goes out on trial.
    Unknown,
}

impl Nodes {
    /// What a reply to `node` may do: a node neither known nor refused
    /// takes one of the few trials a second, unless a reply to it is on
    /// trial already (then this one waits for that one's outcome).
    pub fn admit(&mut self, node: &BrokerNode) -> Clearance {
        match self.standing(node) {
            Standing::Known => Clearance::Known,
            Standing::Refused => Clearance::Refused,
            Standing::Unknown if self.trying.contains(node) => Clearance::Trial,
            Standing::Unknown if self.trials.take() => {
                self.trying.push(node.clone());
                Clearance::Trial
            }
            Standing::Unknown => Clearance::Unproven,
        }
    }

    /// A reply to `node` on trial is over: it reached it (`Some(true)`),
    /// the broker refused it (`Some(false)`), or neither (the path was down).
    pub fn tried(&mut self, node: &BrokerNode, reached: Option<bool>) {
        self.trying.retain(|trying| trying != node);
        match reached {
            Some(true) => self.reached(node.clone()),
            Some(false) => self.refused(node.clone()),
            None => {}
        }
    }

    pub fn standing(&self, node: &BrokerNode) -> Standing {
        if self.known.contains(node) {
            return Standing::Known;
        }
        let refused = self
            .refused
            .iter()
            .any(|(refused, when)| refused == node && when.elapsed() < REFUSED_FOR);
        match refused {
            true => Standing::Refused,
            false => Standing::Unknown,
        }
    }

    /// A reply to `node` was confirmed.
    fn reached(&mut self, node: BrokerNode) {
        self.refused.retain(|(refused, _)| *refused != node);
        if !self.known.contains(&node) {
            if self.known.len() == MAX_KNOWN {
                self.known.pop_front();
            }
            self.known.push_back(node);
        }
    }

    /// The broker refused a reply to `node`, sent alone.
    fn refused(&mut self, node: BrokerNode) {
        self.refused.retain(|(refused, _)| *refused != node);
        if self.refused.len() == MAX_REFUSED {
            self.refused.pop_front();
        }
        self.refused.push_back((node, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct reply-to name as RabbitMQ 3.10 made it, for node `node`.
    fn direct(node: &str, atom_tag: u8) -> String {
        let mut term = vec![131, 88, atom_tag];
        match atom_tag {
            118 | 100 => term.extend((node.len() as u16).to_be_bytes()),
            _ => term.push(node.len() as u8),
        }
        term.extend(node.as_bytes());
        term.extend([0, 0, 2, 255, 0, 0, 0, 0, 107, 23, 62, 135]);
        let pid = base64::engine::general_purpose::STANDARD.encode(term);
        format!("{DIRECT_PREFIX}{pid}.EP1TC5pn3F+neaeXxONm5A==")
    }

    fn rules(allow: &str) -> ReplyRules {
        let allow = allow
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| Pattern::new(p).unwrap())
            .collect();
        ReplyRules::new("wasmrpc", allow)
    }

    #[test]
    fn a_name_rabbitmq_made_names_its_broker_node() {
        // Taken from RabbitMQ 3.10.8 here.
        let real = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAAC/wAAAABrFz6H.EP1TC5pn3F+neaeXxONm5A==";
        let node = BrokerNode(b"reply@9248884".to_vec());
        assert_eq!(rules("").check(real), Ok(Route::Direct(node.clone())));
        assert_eq!(
            rules("").check(&direct("reply@9248884", 118)),
            Ok(Route::Direct(node.clone()))
        );
        assert_eq!(
            rules("").check(&direct("reply@9248884", 119)),
            Ok(Route::Direct(node))
        );
    }

    #[test]
    fn a_direct_name_the_broker_cannot_have_made_is_malformed() {
        let real = direct("reply@9248884", 118);
        let (prefix, key) = real.rsplit_once('.').unwrap();
        for name in [
            "amq.rabbitmq.reply-to.AAAA.key".to_owned(),
            "amq.rabbitmq.reply-to.!!!!.key".to_owned(),
            "amq.rabbitmq.reply-to.".to_owned(),
            // No key.
            prefix.to_owned(),
            // Cut short, or with a byte too many.
            format!("{}.{key}", &prefix[..prefix.len() - 4]),
            format!(
                "{DIRECT_PREFIX}{}.k",
                base64::engine::general_purpose::STANDARD.encode(b"\x83d\x00\x03foo")
            ),
        ] {
            assert_eq!(rules("").check(&name), Err(BadReplyTo::Malformed), "{name}");
        }
    }

    #[test]
    fn the_fleets_own_queues_are_never_replied_to() {
        let rules = rules("");
        for name in [
            "wasmrpc",
            "wasmrpc.dead",
            "wasmrpc.module.fib",
            "wasmrpc.unrouted",
        ] {
            assert_eq!(rules.check(name), Err(BadReplyTo::FleetQueue), "{name}");
        }
        // Another fleet's name that merely starts the same is not this one's.
        assert_eq!(rules.check("wasmrpc-other.dead"), Ok(Route::Queue));
        assert_eq!(rules.check("amq.gen-abc"), Ok(Route::Queue));
    }

    #[test]
    fn patterns_restrict_replies_further() {
        let rules = rules(ReplyRules::TUTORIAL);
        assert_eq!(rules.check("amq.gen-Xy_1"), Ok(Route::Queue));
        assert!(matches!(
            rules.check(&direct("reply@1", 118)),
            Ok(Route::Direct(_))
        ));
        assert_eq!(rules.check("orders"), Err(BadReplyTo::NotAllowed));
        assert_eq!(
            rules.check("amq.rabbitmq.reply-to"),
            Err(BadReplyTo::NotAllowed)
        );
        // The fleet's queues stay refused whatever the patterns say.
        let everything = super::ReplyRules::new("wasmrpc", vec![Pattern::new("*").unwrap()]);
        assert_eq!(
            everything.check("wasmrpc.dead"),
            Err(BadReplyTo::FleetQueue)
        );
    }

    #[test]
    fn a_star_stands_for_any_run_of_characters() {
        let matches = |pattern: &str, name: &str| Pattern::new(pattern).unwrap().matches(name);
        assert!(matches("amq.gen-*", "amq.gen-"));
        assert!(matches("amq.gen-*", "amq.gen-abc"));
        assert!(!matches("amq.gen-*", "xamq.gen-abc"));
        assert!(matches("team-a.*.replies", "team-a.x.y.replies"));
        assert!(!matches("team-a.*.replies", "team-a.replies"));
        assert!(matches("*-replies", "a-replies"));
        assert!(!matches("*-replies", "a-replies-not"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(matches("a*a", "aa"));
        assert!(!matches("a*a", "a"));
        assert!(Pattern::new("").is_err());
    }

    #[test]
    fn only_a_few_replies_a_second_go_out_on_trial() {
        let mut trials = Trials::default();
        let start = trials.last;
        let taken = (0..100).filter(|_| trials.take_at(start)).count();
        assert_eq!(taken, TRIALS_AT_ONCE as usize);
        // Ten seconds on: twenty more earned, but at most five at once.
        let later = start + Duration::from_secs(10);
        let taken = (0..100).filter(|_| trials.take_at(later)).count();
        assert_eq!(taken, TRIALS_AT_ONCE as usize);
        assert!(trials.take_at(later + Duration::from_millis(500)));
        assert!(!trials.take_at(later + Duration::from_millis(500)));
    }

    #[test]
    fn replies_to_a_node_on_trial_wait_for_it_and_take_no_trial() {
        let mut nodes = Nodes::default();
        let honest = BrokerNode(b"reply@1".to_vec());
        // A first burst of replies to one node: one trial, the rest wait.
        for _ in 0..100 {
            assert_eq!(nodes.admit(&honest), Clearance::Trial);
        }
        nodes.tried(&honest, Some(true));
        assert_eq!(nodes.admit(&honest), Clearance::Known);
        // Made-up nodes, each a trial of its own: a few, then none.
        let made_up: Vec<_> = (0..20u32)
            .map(|n| nodes.admit(&BrokerNode(n.to_be_bytes().to_vec())))
            .collect();
        let trials = made_up.iter().filter(|a| **a == Clearance::Trial).count();
        assert_eq!(trials, TRIALS_AT_ONCE as usize - 1);
        assert_eq!(made_up.last(), Some(&Clearance::Unproven));
        let bad = BrokerNode(0u32.to_be_bytes().to_vec());
        nodes.tried(&bad, Some(false));
        assert_eq!(nodes.admit(&bad), Clearance::Refused);
    }

    #[test]
    fn nodes_are_known_once_reached_and_refused_for_a_while() {
        let mut nodes = Nodes::default();
        let a = BrokerNode(b"reply@1".to_vec());
        let b = BrokerNode(b"reply@2".to_vec());
        assert_eq!(nodes.standing(&a), Standing::Unknown);
        nodes.reached(a.clone());
        nodes.refused(b.clone());
        assert_eq!(nodes.standing(&a), Standing::Known);
        assert_eq!(nodes.standing(&b), Standing::Refused);
        // Bounded, whatever names callers make up.
        for n in 0..5000u32 {
            nodes.refused(BrokerNode(n.to_be_bytes().to_vec()));
        }
        assert_eq!(nodes.refused.len(), MAX_REFUSED);
        assert_eq!(nodes.standing(&a), Standing::Known);
    }
}
