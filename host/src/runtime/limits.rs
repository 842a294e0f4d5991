//! The bounds every request of a module runs within.

use std::time::Duration;

use crate::units::{Bytes, display_millis};

/// Per-module bounds on each request. The node resolves them once per module
/// (defaults, then operator flags, then the module's manifest); the runtime
/// enforces them. A caller may shorten the time for one request, never
/// lengthen it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time from the start of instantiation to the returned output.
    pub time: Duration,
    /// Linear memory, in bytes, summed over the module's memories.
    pub memory: u64,
    /// Wasm stack, in bytes. Fixed when the module is compiled.
    pub stack: usize,
    /// Request body size, in bytes; checked before any wasm runs.
    pub request: usize,
    /// Reply body size, in bytes.
    pub reply: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        time: Duration::from_secs(10),
        memory: 128 << 20,
        stack: 512 << 10,
        request: 1 << 20,
        reply: 16 << 20,
    };

    /// The most any limit may be set to. Time stays far below RabbitMQ's
    /// `consumer_timeout` (30 min by default), past which the broker would
    /// close the channel of a node still computing; memory is what wasm32
    /// can address; messages stay within RabbitMQ's default maximum size.
    pub const MAX: Limits = Limits {
        time: Duration::from_secs(15 * 60),
        memory: 4 << 30,
        stack: 64 << 20,
        request: 128 << 20,
        reply: 128 << 20,
    };

    /// Checks every limit is within [`Limits::MAX`] and not zero.
    pub fn validate(&self) -> Result<(), String> {
        let max = Limits::MAX;
        let checks = [
            (
                "time",
                self.time.is_zero(),
                self.time > max.time,
                display_millis(max.time),
            ),
            (
                "memory",
                self.memory == 0,
                self.memory > max.memory,
                Bytes(max.memory).to_string(),
            ),
            (
                "stack",
                self.stack == 0,
                self.stack > max.stack,
                Bytes(max.stack as u64).to_string(),
            ),
            (
                "request",
                false,
                self.request > max.request,
                Bytes(max.request as u64).to_string(),
            ),
            (
                "reply",
                false,
                self.reply > max.reply,
                Bytes(max.reply as u64).to_string(),
            ),
        ];
        for (name, zero, over, max) in checks {
            if zero {
                return Err(format!("the {name} limit must not be zero"));
            }
            if over {
                return Err(format!("the {name} limit may be at most {max}"));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
