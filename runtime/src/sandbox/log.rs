//! A bounded per-call log: the guest's stdout, stderr and `log` import all
//! append to it. Past its capacity, output is dropped (with one marker) and the
//! guest sees no error, so a chatty guest cannot exhaust host memory nor fail
//! because of its logging.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

const TRUNCATED: &str = "\n[log truncated]\n";

#[derive(Debug, Default)]
struct Inner {
    buf: Vec<u8>,
    truncated: bool,
}

/// A shared, bounded byte log. Cloning shares the same buffer.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

impl LogBuffer {
    pub fn new(capacity: usize) -> Self {
        LogBuffer {
            inner: Arc::default(),
            capacity,
        }
    }

    /// Appends as much of `bytes` as fits; marks the log truncated otherwise.
    pub fn append(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().expect("log lock");
        if inner.truncated {
            return;
        }
        let room = self.capacity.saturating_sub(inner.buf.len());
        if bytes.len() <= room {
            inner.buf.extend_from_slice(bytes);
        } else {
            inner.buf.extend_from_slice(&bytes[..room]);
            inner.buf.extend_from_slice(TRUNCATED.as_bytes());
            inner.truncated = true;
        }
    }

    /// Appends one line written through the `log` import.
    pub fn line(&self, level: &str, msg: &str) {
        self.append(format!("[{level}] {msg}\n").as_bytes());
    }

    /// The log so far, as (lossy) UTF-8.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("log lock").buf).into_owned()
    }
}

/// The stream WASI writes stdout or stderr into.
struct LogStream(LogBuffer);

impl IsTerminal for LogBuffer {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogBuffer {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream(self.clone()))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogStream(self.clone()))
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.0.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept: what does not fit is dropped by `append`.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.append(buf);
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
    fn log_is_bounded_and_marked() {
        let log = LogBuffer::new(8);
        log.append(b"hello");
        log.append(b" world");
        log.append(b"more");
        assert_eq!(log.contents(), format!("hello wo{TRUNCATED}"));
    }
}
