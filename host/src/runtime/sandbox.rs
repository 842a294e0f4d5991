//! What one request's instance lives in: its memory accounting and, for
//! components that import WASI, a WASI context with nothing in it.
//!
//! The WASI context grants no files (no preopens), no sockets (every address
//! is refused and name lookup is off), no environment variables, no arguments
//! and an empty stdin. It does give clocks and randomness. Stdout and stderr
//! are captured, up to [`OUTPUT_CAPTURE`] bytes each, and logged after the call.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Limits;

/// How much of a guest's stdout and of its stderr is kept; the rest is dropped.
pub const OUTPUT_CAPTURE: usize = 16 << 10;

/// The store data of one request.
pub struct Sandbox {
    memory_limit: u64,
    memory_used: u64,
    /// Only built for components that import WASI: the others never touch it
    /// and skip its cost.
    wasi: Option<Wasi>,
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
            let stdout = CapturedOutput::default();
            let stderr = CapturedOutput::default();
            let ctx = WasiCtx::builder()
                .stdout(stdout.clone())
                .stderr(stderr.clone())
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build();
            Wasi {
                ctx,
                table: ResourceTable::new(),
                stdout,
                stderr,
            }
        });
        Sandbox {
            memory_limit: limits.memory,
            memory_used: 0,
            wasi,
        }
    }

    /// Logs what the guest wrote and returns its stderr, for error messages.
    pub fn log_output(&self) -> String {
        let Some(wasi) = &self.wasi else {
            return String::new();
        };
        let stdout = wasi.stdout.text();
        if !stdout.is_empty() {
            tracing::info!(target: "wasmrpc::guest", stdout = %stdout.trim_end(), "guest wrote to stdout");
        }
        let stderr = wasi.stderr.text();
        if !stderr.is_empty() {
            tracing::info!(target: "wasmrpc::guest", stderr = %stderr.trim_end(), "guest wrote to stderr");
        }
        stderr
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

/// A stdout or stderr that keeps the first [`OUTPUT_CAPTURE`] bytes and
/// quietly drops the rest, so a chatty guest is never failed for talking.
#[derive(Clone, Default)]
struct CapturedOutput(Arc<Mutex<Vec<u8>>>);

impl CapturedOutput {
    fn keep(&self, bytes: &[u8]) {
        let mut kept = self.0.lock().expect("capture lock");
        let room = OUTPUT_CAPTURE.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
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
