//! Log output on stderr, filtered like `RUST_LOG`: lines for people, or
//! JSON objects for a log shipper; [`Escaped`], for text from outside; and
//! [`Burst`], so that what callers can repeat at will costs a line per burst.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-11-25T21:46:33Z  INFO request{module=fib ...}: served`
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and
    /// the event's fields at the top level, and the fields of the spans it
    /// happened in (a request's `module`, `correlation_id`, `version`,
    /// `trace_id`) under `span`.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax
/// (`info`, `wasmrpc=debug,lapin=warn`, ...).
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // By default a failed write is reported with `eprintln!`, which
        // panics when stderr is a closed pipe: a node must outlive its log reader.
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // The request's fields merged from all its spans, in one object.
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("failed to install the logger: {error}"))
}

/// Text that came from outside the node (a routing key, a correlation id, a
/// deploy's module name, what a guest wrote), shown in a log line with its
/// control characters escaped: a newline in it cannot start a forged line,
/// nor an escape sequence repaint the terminal.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// Says when a line about something callers can make happen as often as
/// they like is due: the first of a burst, then at most one per `every`,
/// with how many were not logged since.
pub struct Burst {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Burst {
    pub const fn new(every: Duration) -> Burst {
        Burst {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line is due now, `n` the lines left out since the
    /// last; `None` when this one is left out.
    pub fn due(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let (last, skipped) = &mut *state;
        if last.is_some_and(|last| last.elapsed() < self.every) {
            *skipped += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::{Burst, Escaped};

    #[test]
    fn a_burst_logs_its_first_line_and_counts_the_rest() {
        let burst = Burst::new(std::time::Duration::from_secs(3600));
        assert_eq!(burst.due(), Some(0));
        for _ in 0..99 {
            assert_eq!(burst.due(), None);
        }
        let every = Burst::new(std::time::Duration::ZERO);
        assert_eq!(every.due(), Some(0));
        assert_eq!(every.due(), Some(0));
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let forged = "fib\n2026-12-01T00:00:00Z ERROR forged\r\u{1b}[2J\0";
        let shown = Escaped(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'));
        assert_eq!(
            Escaped("fib\nERROR\u{1b}[2J é").to_string(),
            "fib\\nERROR\\u{1b}[2J é"
        );
    }
}
