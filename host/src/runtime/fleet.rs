//! A module's calls to other modules: the host side of the WIT `fleet`
//! interface.
//!
//! The runtime checks what it can know alone: which modules this one may
//! call ([`Callees`], from its manifest), how many calls one `call-all` may
//! make, and that the inputs, then the replies, fit in the module's memory
//! limit. It hands the calls that pass to a [`Fleet`], which carries them
//! (over the broker on a node, in this process for `wasmrpc run`) and knows
//! the request's deadline, trace and depth. The runtime knows nothing of how.
//!
//! A guest waiting for its calls is in a host call: its fiber is suspended,
//! so it holds none of the runtime's permits to execute wasm (see
//! [`super::OnPermit`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use super::bindings::wasmrpc::compute::fleet::FleetError;
use crate::names::ModuleName;
use crate::units::Bytes;

/// The name the interface is imported by.
pub const INTERFACE: &str = "wasmrpc:compute/fleet@0.1.0";

/// The kinds of [`FleetError`] the node answers itself, beside the wire's
/// `x-error` kinds that a called module's reply carries.
pub mod kind {
    /// The module's manifest does not name the module called.
    pub const NOT_ALLOWED: &str = "not_allowed";
    /// The chain of calls is at the node's depth limit.
    pub const TOO_DEEP: &str = "too_deep";
    /// More calls in one `call-all` than the node allows.
    pub const TOO_MANY: &str = "too_many";
    /// An input, or the replies, would take the module past its memory limit.
    pub const TOO_LARGE: &str = "too_large";
    /// The node already holds as many waiting callers as it may.
    pub const BUSY: &str = "busy";
    /// The call could not be made (no broker, or no fleet at all).
    pub const UNAVAILABLE: &str = "unavailable";
    /// No reply before the caller's deadline.
    pub const TIMEOUT: &str = "timeout";
    /// The name called is not a module name (too long, or a character a
    /// name may not have): nothing was encoded or sent.
    pub const BAD_REQUEST: &str = "bad_request";

    /// Every kind above.
    pub const ALL: [&str; 8] = [
        BAD_REQUEST,
        NOT_ALLOWED,
        TOO_DEEP,
        TOO_MANY,
        TOO_LARGE,
        BUSY,
        UNAVAILABLE,
        TIMEOUT,
    ];
}

impl FleetError {
    pub fn new(kind: &str, message: impl Into<String>) -> FleetError {
        FleetError {
            kind: kind.to_owned(),
            message: message.into(),
        }
    }
}

/// What one call to another module came to.
pub type Outcome = Result<Vec<u8>, FleetError>;

/// Carries one request's calls to other modules.
pub trait Fleet: Send + Sync {
    /// The most calls one `call-all` may make.
    fn max_calls(&self) -> usize;

    /// Makes `calls` at once and returns one outcome per call, in order.
    /// `memory` is what the calling request holds meanwhile (its instance's
    /// memory and the calls' inputs) and the room its memory limit leaves
    /// for the replies, in all.
    fn call_all(
        &self,
        calls: Vec<(String, Vec<u8>)>,
        memory: (u64, u64),
    ) -> Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + '_>>;

    /// Told of each call the runtime refused without making it.
    fn refused(&self, _error: &FleetError) {}
}

/// The modules a module may call, as its manifest's `calls` names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Callees {
    /// None: the default. A module importing `fleet` is refused at load.
    #[default]
    None,
    /// These, by name.
    Named(Arc<BTreeSet<String>>),
    /// Any (`["*"]`).
    Any,
}

impl Callees {
    /// From a manifest's list: `*` alone means any.
    pub fn from_list(names: &[String]) -> Result<Callees, String> {
        if names.iter().any(|name| name == "*") {
            if names.len() > 1 {
                return Err("calls: \"*\" allows every module and stands alone".into());
            }
            return Ok(Callees::Any);
        }
        if names.is_empty() {
            return Ok(Callees::None);
        }
        Ok(Callees::Named(Arc::new(names.iter().cloned().collect())))
    }

    pub fn allows(&self, module: &str) -> bool {
        match self {
            Callees::None => false,
            Callees::Named(names) => names.contains(module),
            Callees::Any => true,
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Callees::None
    }

    /// As `wasmrpc modules` shows it: names, `*`, or nothing.
    pub fn to_list(&self) -> Vec<String> {
        match self {
            Callees::None => Vec::new(),
            Callees::Named(names) => names.iter().cloned().collect(),
            Callees::Any => vec!["*".to_owned()],
        }
    }
}

/// What a request may use to call other modules: set in its sandbox.
#[derive(Clone)]
pub struct Calling {
    pub fleet: Arc<dyn Fleet>,
    pub callees: Callees,
}

/// What a guest's `call-all` comes to: the calls checked, made through
/// `calling`, and their replies checked, one outcome per call in order.
/// `memory` is the guest's memory in use and its limit; a guest suspended in
/// this call cannot change it.
pub(super) async fn call_all(
    calling: Option<Calling>,
    (used, limit): (u64, u64),
    calls: Vec<(String, Vec<u8>)>,
) -> Vec<Outcome> {
    let count = calls.len();
    let Some(calling) = calling else {
        let error = FleetError::new(kind::UNAVAILABLE, "this run has no fleet to call");
        return vec![Err(error); count];
    };
    let all = |error: FleetError| {
        for _ in 0..count {
            calling.fleet.refused(&error);
        }
        vec![Err(error); count]
    };
    let max = calling.fleet.max_calls();
    if count > max {
        return all(FleetError::new(
            kind::TOO_MANY,
            format!("{count} calls at once, more than the node allows ({max})"),
        ));
    }
    let inputs: u64 = calls.iter().map(|(_, input)| input.len() as u64).sum();
    let room = limit.saturating_sub(used);
    if inputs > room {
        return all(FleetError::new(
            kind::TOO_LARGE,
            format!(
                "the calls' inputs ({}) do not fit in the memory limit of {} ({} in use)",
                Bytes(inputs),
                Bytes(limit),
                Bytes(used)
            ),
        ));
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
    let mut allowed = Vec::with_capacity(count);
    let mut places = Vec::with_capacity(count);
    for (place, (module, input)) in calls.into_iter().enumerate() {
        if let Err(why) = check_name(&module) {
            calling.fleet.refused(&why);
            outcomes[place] = Some(Err(why));
        } else if calling.callees.allows(&module) {
            allowed.push((module, input));
            places.push(place);
        } else {
            let error = FleetError::new(
                kind::NOT_ALLOWED,
                format!("the module's manifest does not allow calls to {module:?}"),
            );
            calling.fleet.refused(&error);
            outcomes[place] = Some(Err(error));
        }
    }
    if !allowed.is_empty() {
        let made = calling.fleet.call_all(allowed, (used + inputs, room)).await;
        // The replies are the guest's once lowered into its memory: they
        // must fit there, in order, as far as they go.
        let mut room = room;
        for (place, outcome) in places.into_iter().zip(made) {
            let outcome = match outcome {
                Ok(reply) if reply.len() as u64 > room => {
                    let error = FleetError::new(
                        kind::TOO_LARGE,
                        format!(
                            "the reply of {} does not fit in the memory limit of {} ({} free)",
                            Bytes(reply.len() as u64),
                            Bytes(limit),
                            Bytes(room)
                        ),
                    );
                    calling.fleet.refused(&error);
                    Err(error)
                }
                Ok(reply) => {
                    room -= reply.len() as u64;
                    Ok(reply)
                }
                Err(error) => Err(error),
            };
            outcomes[place] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            outcome
                .unwrap_or_else(|| Err(FleetError::new(kind::UNAVAILABLE, "the call was not made")))
        })
        .collect()
}

/// Whether `module` is a module name at all, checked before anything about
/// the call is encoded: a name longer than a routing key may be would
/// otherwise fail where nothing expects it.
fn check_name(module: &str) -> Result<(), FleetError> {
    if module.len() > ModuleName::MAX_LEN {
        return Err(FleetError::new(
            kind::BAD_REQUEST,
            format!(
                "a module name of {} bytes is longer than a name may be ({} bytes)",
                module.len(),
                ModuleName::MAX_LEN
            ),
        ));
    }
    module
        .parse::<ModuleName>()
        .map(drop)
        .map_err(|invalid| FleetError::new(kind::BAD_REQUEST, invalid.to_string()))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use super::{Callees, Calling, Fleet, Outcome, call_all, kind};

    /// Answers each call with its input repeated `times`, and counts what
    /// it is told the runtime refused.
    struct Echo {
        times: usize,
        refused: std::sync::Mutex<Vec<String>>,
    }

    impl Fleet for Echo {
        fn max_calls(&self) -> usize {
            3
        }

        fn call_all(
            &self,
            calls: Vec<(String, Vec<u8>)>,
            _memory: (u64, u64),
        ) -> Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + '_>> {
            let outcomes = calls
                .into_iter()
                .map(|(_, input)| Ok(input.repeat(self.times)))
                .collect();
            Box::pin(std::future::ready(outcomes))
        }

        fn refused(&self, error: &super::FleetError) {
            self.refused.lock().unwrap().push(error.kind.clone());
        }
    }

    fn echoing(times: usize, callees: &[&str]) -> (Arc<Echo>, Calling) {
        let echo = Arc::new(Echo {
            times,
            refused: Default::default(),
        });
        let names: Vec<String> = callees.iter().map(|name| name.to_string()).collect();
        let calling = Calling {
            fleet: echo.clone(),
            callees: Callees::from_list(&names).unwrap(),
        };
        (echo, calling)
    }

    fn calls(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(module, input)| (module.to_string(), input.as_bytes().to_vec()))
            .collect()
    }

    fn kinds(outcomes: &[Outcome]) -> Vec<&str> {
        outcomes
            .iter()
            .map(|outcome| {
                outcome
                    .as_ref()
                    .map_or_else(|error| error.kind.as_str(), |_| "ok")
            })
            .collect()
    }

    #[tokio::test]
    async fn calls_outside_the_manifest_fail_in_place_and_the_rest_are_made() {
        let (echo, calling) = echoing(1, &["fib"]);
        let made = call_all(
            Some(calling),
            (0, 1 << 20),
            calls(&[("fib", "1"), ("sum", "2"), ("fib", "3")]),
        )
        .await;
        assert_eq!(kinds(&made), ["ok", kind::NOT_ALLOWED, "ok"]);
        assert_eq!(made[2].as_deref().unwrap(), b"3");
        assert_eq!(*echo.refused.lock().unwrap(), [kind::NOT_ALLOWED]);
    }

    #[tokio::test]
    async fn names_that_are_no_module_names_fail_in_place_even_for_any_callee() {
        let (echo, calling) = echoing(1, &["*"]);
        let long = "a".repeat(300);
        let made = call_all(
            Some(calling),
            (0, 1 << 20),
            calls(&[(long.as_str(), "1"), ("fib", "2"), ("Fib.x", "3")]),
        )
        .await;
        assert_eq!(kinds(&made), [kind::BAD_REQUEST, "ok", kind::BAD_REQUEST]);
        let Err(error) = &made[0] else { unreachable!() };
        assert!(error.message.contains("300 bytes"), "{}", error.message);
        assert!(error.message.len() < 200, "the name is not echoed whole");
        assert_eq!(echo.refused.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn more_calls_than_allowed_fail_every_one() {
        let (echo, calling) = echoing(1, &["*"]);
        let four = calls(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        let made = call_all(Some(calling), (0, 1 << 20), four).await;
        assert_eq!(kinds(&made), [kind::TOO_MANY; 4]);
        assert_eq!(echo.refused.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn inputs_and_replies_must_fit_beside_the_memory_in_use() {
        // 1000 bytes free: 600 of inputs fit, 1200 do not.
        let (_, calling) = echoing(1, &["*"]);
        let big = "x".repeat(600);
        let memory = (9000, 10_000);
        let fits = call_all(Some(calling.clone()), memory, calls(&[("a", &big)])).await;
        assert_eq!(kinds(&fits), ["ok"]);
        let two = calls(&[("a", &big), ("b", &big)]);
        assert_eq!(
            kinds(&call_all(Some(calling), memory, two).await),
            [kind::TOO_LARGE; 2]
        );
        // Replies fill the room in order: 2 x 400 fit, the third does not.
        let (_, calling) = echoing(2, &["*"]);
        let each = "y".repeat(200);
        let three = calls(&[("a", &each), ("b", &each), ("c", &each)]);
        let made = call_all(Some(calling), memory, three).await;
        assert_eq!(kinds(&made), ["ok", "ok", kind::TOO_LARGE]);
    }

    #[tokio::test]
    async fn without_a_fleet_every_call_is_unavailable() {
        let made = call_all(None, (0, 1 << 20), calls(&[("a", "1")])).await;
        assert_eq!(kinds(&made), [kind::UNAVAILABLE]);
    }

    #[test]
    fn callees_are_named_or_any_and_none_by_default() {
        let named = Callees::from_list(&["fib".into(), "sum".into()]).unwrap();
        assert!(named.allows("fib") && named.allows("sum") && !named.allows("other"));
        assert!(
            Callees::from_list(&["*".into()])
                .unwrap()
                .allows("anything")
        );
        assert!(!Callees::default().allows("fib"));
        assert!(Callees::from_list(&[]).unwrap().is_none());
        assert!(Callees::from_list(&["*".into(), "fib".into()]).is_err());
        assert_eq!(named.to_list(), ["fib", "sum"]);
    }
}
