//! The bounds every request runs within.

use std::time::Duration;

/// Per-request bounds. The node resolves them for each module (defaults,
/// then operator flags) and the runtime enforces them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time from the start of instantiation to the returned output.
    pub timeout: Duration,
    /// Linear memory, in bytes, summed over the module's memories.
    pub memory: u64,
    /// Request body size, in bytes; checked before any wasm runs.
    pub input: usize,
    /// Reply body size, in bytes.
    pub output: usize,
}

impl Limits {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MEMORY: u64 = 128 << 20;
    pub const DEFAULT_INPUT: usize = 1 << 20;
    pub const DEFAULT_OUTPUT: usize = 16 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Self::DEFAULT_TIMEOUT,
            memory: Self::DEFAULT_MEMORY,
            input: Self::DEFAULT_INPUT,
            output: Self::DEFAULT_OUTPUT,
        }
    }
}
