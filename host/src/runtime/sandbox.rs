//! What one request's instance lives in: its memory accounting and, for
//! components that import WASI, a WASI context with nothing in it.
//!
//! The WASI context grants no files (no preopens), no sockets (every address
//! is refused and name lookup is off), no environment variables and no
//! arguments. It does give clocks and randomness. For a module, stdin is
//! empty and stdout and stderr are captured, up to [`OUTPUT_CAPTURE`] bytes
//! each, and logged after the call. For a WASI program, stdin is the request
//! body, stdout is the reply (kept up to the reply limit, and counted beyond
//! it) and the last [`OUTPUT_CAPTURE`] bytes of stderr are kept for the error
//! message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::wasmrpc::compute::fleet::Host as FleetHost;
use super::fleet::{self, Calling, Outcome};
use super::limits::Limits;
use crate::logging::Escaped;

/// How much of a guest's stdout and of its stderr is kept; the rest is dropped.
pub const OUTPUT_CAPTURE: usize = 16 << 10;

/// The store data of one request.
pub struct Sandbox {
    memory_limit: u64,
    memory_used: u64,
    /// Only built for components that import WASI: the others never touch it
    /// and skip its cost.
    wasi: Option<Wasi>,
    /// A WASI program: its stdout is its output, not something to log.
    program: bool,
    /// What its calls to other modules go through, if it makes any.
    calling: Option<Calling>,
}

struct Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
}

/// A guest grew its memory past its limit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded")]
pub struct MemoryLimitExceeded;

/// A guest was still running at its deadline.
#[derive(Debug, thiserror::Error)]
#[error("time limit exceeded")]
pub struct DeadlineExceeded;

impl Sandbox {
    pub fn new(limits: &Limits, with_wasi: bool) -> Self {
        let wasi = with_wasi.then(|| {
            Wasi::new(
                CapturedOutput::head(OUTPUT_CAPTURE),
                CapturedOutput::head(OUTPUT_CAPTURE),
                None,
            )
        });
        Sandbox {
            memory_limit: limits.memory,
            memory_used: 0,
            wasi,
            program: false,
            calling: None,
        }
    }

    /// The store data of a WASI program run on `input`: stdin is the input,
    /// stdout is kept up to the reply limit.
    pub fn program(limits: &Limits, input: &[u8]) -> Self {
        let wasi = Wasi::new(
            CapturedOutput::head(limits.reply),
            CapturedOutput::tail(OUTPUT_CAPTURE),
            Some(MemoryInputPipe::new(input.to_vec())),
        );
        Sandbox {
            memory_limit: limits.memory,
            memory_used: 0,
            wasi: Some(wasi),
            program: true,
            calling: None,
        }
    }

    pub fn set_calling(&mut self, calling: Option<Calling>) {
        self.calling = calling;
    }

    /// A program's stdout: what it kept, and how many bytes were written in
    /// all (more than were kept if it wrote past the reply limit).
    pub fn take_stdout(&self) -> (Vec<u8>, usize) {
        match &self.wasi {
            Some(wasi) => wasi.stdout.take(),
            None => (Vec::new(), 0),
        }
    }

    /// Logs what the guest wrote and returns its stderr, for error messages.
    pub fn log_output(&self) -> String {
        let Some(wasi) = &self.wasi else {
            return String::new();
        };
        let stdout = if self.program {
            String::new()
        } else {
            wasi.stdout.text()
        };
        if !stdout.is_empty() {
            tracing::info!(target: "wasmrpc::guest", stdout = %Escaped(stdout.trim_end()), "guest wrote to stdout");
        }
        let stderr = wasi.stderr.text();
        if !stderr.is_empty() {
            tracing::info!(target: "wasmrpc::guest", stderr = %Escaped(stderr.trim_end()), "guest wrote to stderr");
        }
        stderr
    }
}

/// A guest's calls to other modules: checked and made by [`fleet::call_all`].
impl FleetHost for Sandbox {
    async fn call(&mut self, module: String, input: Vec<u8>) -> Outcome {
        let mut outcomes = self.call_all(vec![(module, input)]).await;
        outcomes.pop().expect("one outcome per call")
    }

    async fn call_all(&mut self, calls: Vec<(String, Vec<u8>)>) -> Vec<Outcome> {
        let memory = (self.memory_used, self.memory_limit);
        fleet::call_all(self.calling.clone(), memory, calls).await
    }
}

impl Wasi {
    fn new(stdout: CapturedOutput, stderr: CapturedOutput, stdin: Option<MemoryInputPipe>) -> Wasi {
        let mut builder = WasiCtx::builder();
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some(stdin) = stdin {
            builder.stdin(stdin);
        }
        Wasi {
            ctx: builder.build(),
            table: ResourceTable::new(),
            stdout,
            stderr,
        }
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self
            .wasi
            .as_mut()
            .expect("a component that imports WASI gets a WASI context");
        WasiCtxView {
            ctx: &mut wasi.ctx,
            table: &mut wasi.table,
        }
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // `desired` is per memory; a component may have several, so account
        // for the growth across all of them.
        let used = self.memory_used + (desired - current) as u64;
        if used > self.memory_limit {
            // An error rather than `Ok(false)`: a refused grow makes most
            // guests abort with a bare `unreachable`, which would hide the cause.
            return Err(MemoryLimitExceeded.into());
        }
        self.memory_used = used;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references, 8 bytes each: count them as memory.
        Ok(desired as u64 * 8 <= self.memory_limit)
    }
}

/// A stdout or stderr that keeps the first (or the last) `cap` bytes and
/// quietly drops the rest, counting them, so a chatty guest is never failed
/// for talking and the host never holds more than `cap`.
#[derive(Clone)]
struct CapturedOutput(Arc<Mutex<Captured>>);

struct Captured {
    kept: VecDeque<u8>,
    cap: usize,
    /// Keep the last bytes rather than the first.
    tail: bool,
    written: usize,
}

impl CapturedOutput {
    fn head(cap: usize) -> Self {
        Self::new(cap, false)
    }

    fn tail(cap: usize) -> Self {
        Self::new(cap, true)
    }

    fn new(cap: usize, tail: bool) -> Self {
        CapturedOutput(Arc::new(Mutex::new(Captured {
            kept: VecDeque::new(),
            cap,
            tail,
            written: 0,
        })))
    }

    fn keep(&self, bytes: &[u8]) {
        let mut captured = self.0.lock().expect("capture lock");
        captured.written = captured.written.saturating_add(bytes.len());
        if captured.tail {
            let bytes = &bytes[bytes.len().saturating_sub(captured.cap)..];
            let over = (captured.kept.len() + bytes.len()).saturating_sub(captured.cap);
            captured.kept.drain(..over);
            captured.kept.extend(bytes);
        } else {
            let room = captured.cap.saturating_sub(captured.kept.len());
            captured.kept.extend(&bytes[..bytes.len().min(room)]);
        }
    }

    fn text(&self) -> String {
        let captured = self.0.lock().expect("capture lock");
        let (front, back) = captured.kept.as_slices();
        String::from_utf8_lossy(&[front, back].concat()).into_owned()
    }

    fn take(&self) -> (Vec<u8>, usize) {
        let mut captured = self.0.lock().expect("capture lock");
        let written = captured.written;
        (std::mem::take(&mut captured.kept).into(), written)
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(usize::MAX)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_its_head_or_its_tail_and_counts_everything() {
        let head = CapturedOutput::head(4);
        head.keep(b"abc");
        head.keep(b"defg");
        assert_eq!(head.take(), (b"abcd".to_vec(), 7));

        let tail = CapturedOutput::tail(4);
        tail.keep(b"abc");
        tail.keep(b"de");
        assert_eq!(tail.text(), "bcde");
        tail.keep(b"0123456789");
        assert_eq!(tail.take(), (b"6789".to_vec(), 15));
    }
}
