//! A test module that passes its input down a chain of modules: input
//! `a,b,c;ARG` calls `a` with `b,c;ARG`, which (if `a` is a relay too) calls
//! `b` with `c;ARG`, and so on; the last module gets `ARG`. The reply comes
//! back up the chain unchanged. A call that fails fails the relay with the
//! error's kind and message, so the first failure reaches the caller.
//!
//! A chain that starts with `*N` fans out: `*8,fib;ARG` calls `fib` with
//! `ARG` 8 times at once and returns the replies joined by newlines.

use wasmrpc::compute::fleet;

wit_bindgen::generate!({ path: "../../wit", world: "fleet-module" });

struct Relay;

impl Guest for Relay {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let text = String::from_utf8(input)
            .map_err(|_| CallError::InvalidInput("expected text".into()))?;
        let (chain, arg) = text
            .split_once(';')
            .ok_or_else(|| CallError::InvalidInput(format!("expected CHAIN;ARG, got {text:?}")))?;
        let mut hops = chain.split(',');
        let first = hops.next().unwrap_or_default();
        let fan = match first.strip_prefix('*') {
            Some(count) => Some(
                count
                    .parse::<usize>()
                    .map_err(|_| CallError::InvalidInput(format!("bad fan-out {first:?}")))?,
            ),
            None => None,
        };
        let next = match fan {
            Some(_) => hops.next().unwrap_or_default(),
            None => first,
        };
        let rest: Vec<&str> = hops.collect();
        let input = match rest.is_empty() {
            true => arg.to_owned(),
            false => format!("{};{arg}", rest.join(",")),
        };
        let failed = |error: fleet::FleetError| {
            CallError::Failed(format!("{next}: {}: {}", error.kind, error.message))
        };
        match fan {
            None => fleet::call(next, input.as_bytes()).map_err(failed),
            Some(count) => {
                let calls = vec![(next.to_owned(), input.into_bytes()); count];
                let mut replies = Vec::new();
                for result in fleet::call_all(&calls) {
                    replies.push(String::from_utf8_lossy(&result.map_err(failed)?).into_owned());
                }
                Ok(replies.join("\n").into_bytes())
            }
        }
    }
}

export!(Relay);
