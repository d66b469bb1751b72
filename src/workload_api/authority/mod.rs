//! Repair of the HTTP/2 `:authority` that gRPC clients send over Unix sockets.
//!
//! This module owns [`AuthorityFix`], an I/O adapter that sits between an
//! accepted Unix socket and tonic's HTTP/2 server, and the HTTP/2 frame and
//! HPACK handling it needs to rewrite the client-to-server byte stream.
//!
//! Why it exists: gRPC C-core (and so grpcio and py-spiffe) and grpc-java put
//! the Unix socket *path* in the `:authority` pseudo-header, e.g.
//! `/run/sigil/workload.sock`. hyper's `h2` server parses `:authority` as a
//! URI authority, finds it malformed and resets the stream with
//! `PROTOCOL_ERROR`, so every call from those clients fails. The upstream fix
//! (hyperium/h2 PR #487) is not merged, so Sigil repairs the bytes before
//! `h2` sees them: each header block is decoded, an `:authority` that does not
//! parse as [`http::uri::Authority`] (the same check `h2` applies) is replaced
//! by `localhost`, and the block is encoded again.
//!
//! HPACK is stateful per connection, so once the adapter re-encodes one block
//! it must re-encode all of them: the server's decoder only ever sees our
//! encoder's output. Our encoder keeps a dynamic table of size 0, so it never
//! refers to dynamic-table entries; what the server's decoder stores there
//! (within its own limit, 4096 bytes by default) can then never disagree with
//! what we meant, whatever table size the server advertises. Compression
//! does not matter on a local socket.
//!
//! Only the read side (client to server) is rewritten; the write side passes
//! through. Frames other than HEADERS and CONTINUATION pass byte for byte, and
//! a connection that does not start with the HTTP/2 client preface passes
//! untouched so that `h2` reports its own error.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use self::rewriter::Rewriter;

mod hpack;
mod rewriter;
#[cfg(test)]
mod tests;

/// How many bytes one read asks of the inner stream.
const READ_CHUNK: usize = 8192;

/// Wraps an accepted connection so that gRPC clients which send the socket
/// path as `:authority` (py-spiffe, grpc-java) are not rejected by tonic's
/// HTTP/2 server. See the module documentation for how and why.
pub struct AuthorityFix<S> {
    inner: S,
    /// Told how many header bytes each read decoded (the client's bill).
    charge: Option<Box<dyn Fn(usize) + Send + Sync>>,
    /// Told once if a request's HEADERS started within the watched bytes.
    on_early_headers: Option<Box<dyn Fn() + Send + Sync>>,
    rewriter: Rewriter,
    /// Bytes read from `inner` and not yet processed.
    input: BytesMut,
    /// Processed bytes not yet handed to the reader.
    output: BytesMut,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps `inner`, which must be at the very start of the connection so
    /// the first bytes read are the client's preface.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            charge: None,
            on_early_headers: None,
            rewriter: Rewriter::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
        }
    }
}

impl<S> AuthorityFix<S> {
    /// Reports the decoded size of every header block to `charge`, so the
    /// work a client causes through HPACK table references is billed to it,
    /// not just the bytes it sent.
    #[must_use]
    pub fn charging(mut self, charge: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.charge = Some(Box::new(charge));
        self
    }
}

impl<S> AuthorityFix<S> {
    /// Calls `on` (once) if a HEADERS frame, a request, starts within the
    /// first `limit` bytes the client sent: bytes it had written before the
    /// daemon pinned it (see `attest::socket`).
    #[must_use]
    pub fn watching_early_headers(
        mut self,
        limit: u64,
        on: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        self.rewriter.watch_early_headers(limit);
        self.on_early_headers = Some(Box::new(on));
        self
    }
}

impl<S: fmt::Debug> fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("inner", &self.inner)
            .field("phase", &self.rewriter.phase)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AuthorityFix<S> {
    /// Reads one chunk from the inner stream into `input`; sets `eof` when
    /// the inner stream has ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let start = self.input.len();
        self.input.resize(start + READ_CHUNK, 0);
        let mut chunk = ReadBuf::new(&mut self.input[start..]);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut chunk);
        let filled = chunk.filled().len();
        self.input.truncate(start + filled);
        ready!(polled)?;
        if filled == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Client-to-server bytes, with every header block decoded and re-encoded.
impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(this.rewriter.finish(&this.input));
            }
            this.rewriter.ensure_usable()?;
            ready!(this.poll_fill(cx))?;
            let processed = this.rewriter.process(&mut this.input, &mut this.output);
            if this.rewriter.early_headers
                && let Some(on) = this.on_early_headers.take()
            {
                on();
            }
            let decoded = this.rewriter.take_decoded();
            if let (Some(charge), 1..) = (&this.charge, decoded) {
                charge(decoded);
            }
            processed?;
        }
    }
}

/// Server-to-client bytes pass through unchanged.
impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Exposes the inner stream's connection info, so that the peer credentials
/// of a Unix socket (`UdsConnectInfo`) still reach the request extensions.
impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
