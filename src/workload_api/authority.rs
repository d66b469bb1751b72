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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE default; every server accepts frames this large.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// hyper's default SETTINGS_MAX_HEADER_LIST_SIZE, which tonic keeps: the
/// largest decoded header list (RFC 7541 sizes: name + value + 32 per field)
/// the server accepts; it refuses larger ones on its own.
const SERVER_MAX_HEADER_LIST: usize = 16 << 10;
/// Largest header block fragment we buffer for one block. loona-hpack's
/// Huffman decoder is slow (about 5 MB/s optimised), so blocks far beyond
/// anything the server would accept are refused before decoding.
const MAX_BLOCK_FRAGMENT: usize = 4 * SERVER_MAX_HEADER_LIST;
/// Largest decoded header list we build; bounds what dynamic-table
/// references can expand a small block to.
const MAX_DECODED_LIST: usize = 4 * SERVER_MAX_HEADER_LIST;
/// Most header fields in one block: every field counts at least 32 bytes
/// against the server's list limit. Checked before decoding, because
/// loona-hpack builds a Huffman table for each Huffman-coded string (about
/// 20 µs each, so 1 MiB of empty strings would take 20 s).
const MAX_FIELDS: usize = SERVER_MAX_HEADER_LIST / 32;
/// The HPACK table size the server advertises (h2's default); a client may
/// not grow its table past it.
const CLIENT_TABLE_SIZE_LIMIT: usize = 4096;
/// How many bytes one read asks of the inner stream.
const READ_CHUNK: usize = 8192;
/// What replaces an `:authority` that is not a valid URI authority.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// Wraps an accepted connection so that gRPC clients which send the socket
/// path as `:authority` (py-spiffe, grpc-java) are not rejected by tonic's
/// HTTP/2 server. See the module documentation for how and why.
pub struct AuthorityFix<S> {
    inner: S,
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
            rewriter: Rewriter::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
        }
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
            this.rewriter.process(&mut this.input, &mut this.output)?;
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

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Checking the preface; `matched` bytes of it have been seen.
    Preface { matched: usize },
    /// At a frame boundary.
    FrameHeader,
    /// Inside the payload of a frame that passes through unchanged.
    Forward { remaining: usize },
    /// Not HTTP/2 with prior knowledge: everything passes through.
    Opaque,
    /// An error was reported; the connection must not be read further.
    Failed,
}

/// A frame header as it appears on the wire.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    length: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let header: &[u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *header;
        Some(Self {
            length: (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2),
            kind,
            flags,
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_ID_MASK,
        })
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_uint(self.length as u64, 3);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream_id & STREAM_ID_MASK);
    }

    fn is_header_block(&self) -> bool {
        self.kind == TYPE_HEADERS || self.kind == TYPE_CONTINUATION
    }
}

/// A header block whose HEADERS frame has arrived but not its END_HEADERS.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<Bytes>,
    fragment: BytesMut,
}

/// The sans-I/O part of the adapter: turns client bytes into rewritten bytes.
struct Rewriter {
    phase: Phase,
    pending: Option<PendingBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(CLIENT_TABLE_SIZE_LIMIT);
        // loona-hpack's encoder indexes every literal whose name is not in
        // the static table into a dynamic table (4096 bytes by default) and
        // refers back to it. A table of size 0 keeps it to static-table
        // references and literals: see the module documentation for why.
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(0);
        Self {
            phase: Phase::Preface { matched: 0 },
            pending: None,
            decoder,
            encoder,
        }
    }

    /// Consumes what it can of `input` and appends the result to `out`.
    /// After an error the rewriter stays failed.
    fn process(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        let result = self.process_inner(input, out);
        if result.is_err() {
            self.phase = Phase::Failed;
            self.pending = None;
            input.clear();
        }
        result
    }

    /// Refuses further reading once an error has been reported.
    fn ensure_usable(&self) -> io::Result<()> {
        if self.phase == Phase::Failed {
            return Err(invalid("the HTTP/2 client stream was already rejected"));
        }
        Ok(())
    }

    fn process_inner(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            let progressed = match self.phase {
                Phase::Preface { matched } => self.step_preface(input, out, matched),
                Phase::FrameHeader => self.step_frame(input, out)?,
                Phase::Forward { remaining } => self.step_forward(input, out, remaining),
                Phase::Opaque => {
                    out.extend_from_slice(&input.split());
                    false
                }
                Phase::Failed => return self.ensure_usable(),
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Checks the end of the client's stream: ending inside a frame or a
    /// header block is an error, as `h2` would report it.
    fn finish(&self, input: &BytesMut) -> io::Result<()> {
        let truncated = match self.phase {
            Phase::Opaque => false,
            Phase::Failed => return self.ensure_usable(),
            Phase::Forward { .. } | Phase::Preface { matched: 1.. } => true,
            Phase::Preface { matched: 0 } | Phase::FrameHeader => {
                !input.is_empty() || self.pending.is_some()
            }
        };
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "HTTP/2 client stream ended inside a frame or header block",
            ));
        }
        Ok(())
    }

    fn step_preface(&mut self, input: &mut BytesMut, out: &mut BytesMut, matched: usize) -> bool {
        let expected = &PREFACE[matched..];
        let n = expected.len().min(input.len());
        if n == 0 {
            return false;
        }
        if input[..n] != expected[..n] {
            tracing::debug!("client did not send the HTTP/2 preface; passing bytes through");
            self.phase = Phase::Opaque;
            return true;
        }
        out.extend_from_slice(&input.split_to(n));
        self.phase = if matched + n == PREFACE.len() {
            Phase::FrameHeader
        } else {
            Phase::Preface {
                matched: matched + n,
            }
        };
        true
    }

    fn step_forward(&mut self, input: &mut BytesMut, out: &mut BytesMut, remaining: usize) -> bool {
        let n = remaining.min(input.len());
        out.extend_from_slice(&input.split_to(n));
        let remaining = remaining - n;
        self.phase = if remaining == 0 {
            Phase::FrameHeader
        } else {
            Phase::Forward { remaining }
        };
        remaining == 0
    }

    /// Handles the frame at the head of `input`, if enough of it is there.
    fn step_frame(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<bool> {
        let Some(header) = FrameHeader::parse(input) else {
            return Ok(false);
        };
        self.check_sequence(&header)?;
        if !header.is_header_block() {
            out.extend_from_slice(&input.split_to(FRAME_HEADER_LEN));
            self.phase = Phase::Forward {
                remaining: header.length,
            };
            return Ok(true);
        }
        let frame_len = FRAME_HEADER_LEN + header.length;
        if input.len() < frame_len {
            input.reserve(frame_len - input.len());
            return Ok(false);
        }
        let mut frame = input.split_to(frame_len).freeze();
        frame.advance(FRAME_HEADER_LEN);
        if header.kind == TYPE_HEADERS {
            self.start_block(&header, frame)?;
        } else {
            self.continue_block(frame);
        }
        if header.flags & FLAG_END_HEADERS != 0 {
            self.finish_block(out)?;
        }
        Ok(true)
    }

    /// Enforces RFC 9113 §6.10 (a header block is HEADERS followed only by
    /// CONTINUATION frames of the same stream) and the size bound, before
    /// any payload is buffered.
    fn check_sequence(&self, header: &FrameHeader) -> io::Result<()> {
        match (&self.pending, header.kind) {
            (None, TYPE_CONTINUATION) => Err(invalid(format!(
                "CONTINUATION frame on stream {} without a preceding HEADERS frame",
                header.stream_id
            ))),
            (Some(block), TYPE_CONTINUATION) if block.stream_id != header.stream_id => {
                Err(invalid(format!(
                    "CONTINUATION frame on stream {} inside the header block of stream {}",
                    header.stream_id, block.stream_id
                )))
            }
            (Some(block), TYPE_CONTINUATION)
                if block.fragment.len() + header.length > MAX_BLOCK_FRAGMENT =>
            {
                Err(too_large_block())
            }
            (Some(block), kind) if kind != TYPE_CONTINUATION => Err(invalid(format!(
                "frame of type {kind:#x} inside the header block of stream {}",
                block.stream_id
            ))),
            (None, TYPE_HEADERS) if header.length > MAX_BLOCK_FRAGMENT => Err(too_large_block()),
            _ => Ok(()),
        }
    }

    /// Opens a header block from a HEADERS frame payload: strips the padding
    /// and keeps the priority fields.
    fn start_block(&mut self, header: &FrameHeader, mut payload: Bytes) -> io::Result<()> {
        let pad_len = if header.flags & FLAG_PADDED != 0 {
            if payload.is_empty() {
                return Err(invalid("PADDED HEADERS frame without a pad length"));
            }
            usize::from(payload.get_u8())
        } else {
            0
        };
        let priority = if header.flags & FLAG_PRIORITY != 0 {
            if payload.len() < PRIORITY_LEN {
                return Err(invalid("HEADERS frame too short for its PRIORITY fields"));
            }
            Some(payload.split_to(PRIORITY_LEN))
        } else {
            None
        };
        if pad_len > payload.len() {
            return Err(invalid(format!(
                "HEADERS frame on stream {} has more padding than payload",
                header.stream_id
            )));
        }
        payload.truncate(payload.len() - pad_len);
        self.pending = Some(PendingBlock {
            stream_id: header.stream_id,
            end_stream: header.flags & FLAG_END_STREAM != 0,
            priority,
            fragment: BytesMut::from(payload.as_ref()),
        });
        Ok(())
    }

    fn continue_block(&mut self, payload: Bytes) {
        // `check_sequence` has made sure a block is pending.
        if let Some(block) = self.pending.as_mut() {
            block.fragment.extend_from_slice(&payload);
        }
    }

    /// Decodes, repairs and re-encodes the completed header block.
    fn finish_block(&mut self, out: &mut BytesMut) -> io::Result<()> {
        let Some(block) = self.pending.take() else {
            return Ok(());
        };
        if has_too_many_fields(&block.fragment) {
            return Err(invalid(format!(
                "client header block on stream {} has more than {MAX_FIELDS} fields",
                block.stream_id
            )));
        }
        let mut headers = decode_block(&mut self.decoder, &block.fragment)?;
        repair_authority(&mut headers, block.stream_id);
        let mut encoded = Vec::with_capacity(block.fragment.len());
        self.encoder
            .encode_into(
                headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
                &mut encoded,
            )
            .map_err(|e| invalid(format!("HPACK encoding failed: {e}")))?;
        write_block(out, &block, &encoded);
        Ok(())
    }
}

/// Counts the field representations of an HPACK block without decoding
/// them (RFC 7541 §6) and tells whether there are more than [`MAX_FIELDS`].
/// A malformed block counts as fine here: the decoder reports it.
fn has_too_many_fields(block: &[u8]) -> bool {
    let mut rest = block;
    let mut fields = 0;
    while let Some(&first) = rest.first() {
        let (prefix, literal) = match first {
            0x80.. => (7, false), // indexed field
            0x40.. => (6, true),  // literal with incremental indexing
            0x20.. => (5, false), // dynamic table size update: not a field
            _ => (4, true),       // literal without indexing / never indexed
        };
        let Some((index, tail)) = hpack_integer(rest, prefix) else {
            return false;
        };
        rest = tail;
        if literal {
            let name = if index == 0 {
                skip_hpack_string(rest)
            } else {
                Some(rest)
            };
            let Some(tail) = name.and_then(skip_hpack_string) else {
                return false;
            };
            rest = tail;
        }
        if prefix != 5 {
            fields += 1;
        }
        if fields > MAX_FIELDS {
            return true;
        }
    }
    false
}

/// Reads an HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1), at
/// most four continuation octets as loona-hpack allows.
fn hpack_integer(buf: &[u8], prefix: u8) -> Option<(usize, &[u8])> {
    let mask = (1u8 << prefix) - 1;
    let (&first, mut rest) = buf.split_first()?;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Some((value, rest));
    }
    for shift in [0, 7, 14, 21] {
        let (&octet, tail) = rest.split_first()?;
        rest = tail;
        value += usize::from(octet & 0x7f) << shift;
        if octet & 0x80 == 0 {
            return Some((value, rest));
        }
    }
    None
}

/// Skips an HPACK string literal (RFC 7541 §5.2).
fn skip_hpack_string(buf: &[u8]) -> Option<&[u8]> {
    let (len, rest) = hpack_integer(buf, 7)?;
    rest.get(len..)
}

/// Decodes one header block, refusing header lists whose decoded size
/// exceeds [`MAX_DECODED_LIST`] (a small block can expand a lot through
/// dynamic-table references).
fn decode_block(decoder: &mut Decoder<'static>, fragment: &[u8]) -> io::Result<HeaderList> {
    let mut headers = HeaderList::new();
    let mut size = 0usize;
    decoder
        .decode_with_cb(fragment, |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_DECODED_LIST {
                headers.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|e| {
            invalid(format!(
                "HPACK decoding of a client header block failed: {e}"
            ))
        })?;
    if size > MAX_DECODED_LIST {
        return Err(invalid(format!(
            "client header list decodes to more than {MAX_DECODED_LIST} bytes"
        )));
    }
    Ok(headers)
}

/// Replaces an `:authority` that `h2` would reject with `localhost`.
fn repair_authority(headers: &mut HeaderList, stream_id: u32) {
    for (name, value) in headers.iter_mut() {
        if name.as_slice() == b":authority"
            && http::uri::Authority::try_from(value.as_slice()).is_err()
        {
            tracing::debug!(
                stream_id,
                authority = %value.escape_ascii(),
                "replacing an invalid :authority with localhost"
            );
            *value = FALLBACK_AUTHORITY.to_vec();
        }
    }
}

/// Writes a HEADERS frame and as many CONTINUATION frames as `encoded`
/// needs, END_HEADERS on the last one only.
fn write_block(out: &mut BytesMut, block: &PendingBlock, encoded: &[u8]) {
    let priority: &[u8] = block.priority.as_deref().unwrap_or_default();
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME_PAYLOAD - priority.len()));
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let mut header = FrameHeader {
        length: priority.len() + first.len(),
        kind: TYPE_HEADERS,
        flags,
        stream_id: block.stream_id,
    };
    header.write(out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        header.length = chunk.len();
        header.kind = TYPE_CONTINUATION;
        header.flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        header.write(out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn too_large_block() -> io::Error {
    invalid(format!(
        "client header block is larger than {MAX_BLOCK_FRAGMENT} bytes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const DATA: u8 = 0x0;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;

    /// A client stream that hands out its bytes 1 to `max_chunk` at a time
    /// and answers every other poll with `Pending`.
    struct Trickle {
        data: Bytes,
        step: usize,
        max_chunk: usize,
        pending_next: bool,
    }

    impl Trickle {
        fn new(data: Vec<u8>, max_chunk: usize) -> Self {
            Self {
                data: Bytes::from(data),
                step: 0,
                max_chunk,
                pending_next: true,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.pending_next = !this.pending_next;
            if !this.pending_next {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.step += 1;
            let want = this.step % this.max_chunk + 1;
            let n = want.min(this.data.len()).min(buf.remaining());
            buf.put_slice(&this.data.split_to(n));
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Feeds `input` through the adapter in chunks of 1 to `max_chunk`
    /// bytes, reading into buffers of 1 to 11 bytes.
    async fn rewrite_in_chunks(input: Vec<u8>, max_chunk: usize) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(Trickle::new(input, max_chunk));
        let mut out = Vec::new();
        let mut buf = [0u8; 11];
        for round in 0.. {
            let size = round % buf.len() + 1;
            let n = fix.read(&mut buf[..size]).await?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    async fn rewrite(input: Vec<u8>) -> io::Result<Vec<u8>> {
        rewrite_in_chunks(input, 7).await
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameHeader {
            length: payload.len(),
            kind,
            flags,
            stream_id,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    /// Splits complete frames off `bytes`, leaving any partial frame.
    fn take_frames(bytes: &mut BytesMut) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(h) = FrameHeader::parse(bytes) {
            if bytes.len() < FRAME_HEADER_LEN + h.length {
                break;
            }
            let raw = bytes.split_to(FRAME_HEADER_LEN + h.length);
            frames.push(Frame {
                kind: h.kind,
                flags: h.flags,
                stream_id: h.stream_id,
                payload: raw[FRAME_HEADER_LEN..].to_vec(),
            });
        }
        frames
    }

    /// Parses the adapter's output: the preface, then whole frames only.
    fn parse_output(output: &[u8]) -> Vec<Frame> {
        assert_eq!(&output[..PREFACE.len()], PREFACE);
        let mut rest = BytesMut::from(&output[PREFACE.len()..]);
        let frames = take_frames(&mut rest);
        assert!(rest.is_empty(), "trailing partial frame");
        frames
    }

    /// Reassembles and decodes every header block of the output, in order,
    /// with one fresh decoder, as the server would.
    fn decode_blocks(frames: &[Frame]) -> Vec<(u32, HeaderList)> {
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        for f in frames.iter().filter(|f| f.is_header_block()) {
            assert_eq!(f.flags & FLAG_PADDED, 0, "output must not be padded");
            let skip = if f.kind == TYPE_HEADERS && f.flags & FLAG_PRIORITY != 0 {
                PRIORITY_LEN
            } else {
                0
            };
            fragment.extend_from_slice(&f.payload[skip..]);
            if f.flags & FLAG_END_HEADERS != 0 {
                blocks.push((f.stream_id, decoder.decode(&fragment).unwrap()));
                fragment.clear();
            }
        }
        blocks
    }

    impl Frame {
        fn is_header_block(&self) -> bool {
            self.kind == TYPE_HEADERS || self.kind == TYPE_CONTINUATION
        }
    }

    fn request(authority: &str) -> HeaderList {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encode(encoder: &mut Encoder<'static>, headers: &HeaderList) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// An HPACK literal without indexing whose name is static entry
    /// `name_index` (RFC 7541 §6.2.2); `value` must be under 127 bytes.
    fn literal_without_indexing(name_index: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![name_index, u8::try_from(value.len()).unwrap()];
        out.extend_from_slice(value);
        out
    }

    fn authority_of(headers: &HeaderList) -> &[u8] {
        let found = headers.iter().find(|(n, _)| n.as_slice() == b":authority");
        found.map(|(_, v)| v.as_slice()).unwrap()
    }

    fn with_authority(mut headers: HeaderList, authority: &str) -> HeaderList {
        for (n, v) in &mut headers {
            if n.as_slice() == b":authority" {
                *v = authority.as_bytes().to_vec();
            }
        }
        headers
    }

    fn assert_invalid_data(result: io::Result<Vec<u8>>, needle: &str) {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }

    #[tokio::test]
    async fn a_header_block_split_over_continuation_frames_is_reassembled_and_rewritten() {
        let block = encode(&mut Encoder::new(), &request("/run/sigil/workload.sock"));
        let (a, rest) = block.split_at(5);
        let (b, c) = rest.split_at(9);
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_STREAM, 1, a),
            frame(TYPE_CONTINUATION, 0, 1, b),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
        ]);

        let frames = parse_output(&rewrite(input).await.unwrap());

        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].flags, FLAG_END_STREAM | FLAG_END_HEADERS);
        let blocks = decode_blocks(&frames);
        assert_eq!(blocks, vec![(1, with_authority(request("x"), "localhost"))]);
    }

    #[tokio::test]
    async fn a_padded_headers_frame_loses_its_padding_and_keeps_its_headers() {
        let block = encode(&mut Encoder::new(), &request("/tmp/x.sock"));
        let mut payload = vec![13];
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 13]);
        let flags = FLAG_PADDED | FLAG_END_HEADERS;
        let input = with_preface(&[frame(TYPE_HEADERS, flags, 3, &payload)]);

        let frames = parse_output(&rewrite(input).await.unwrap());

        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].flags, FLAG_END_HEADERS);
        let blocks = decode_blocks(&frames);
        assert_eq!(blocks, vec![(3, with_authority(request("x"), "localhost"))]);
    }

    #[tokio::test]
    async fn a_block_that_grows_past_16_kib_is_split_with_end_headers_only_on_the_last_frame() {
        // The client indexes 4000 bytes once, then refers to them five
        // times: a 20-byte block that decodes to about 20 KB.
        let big = ("x-big".as_bytes().to_vec(), vec![b'v'; 4000]);
        let block1 = encode(&mut Encoder::new(), &vec![big.clone()]);
        let mut block2 = vec![0x83, 0x86]; // :method POST, :scheme http
        block2.extend(literal_without_indexing(
            4,
            b"/SpiffeWorkloadAPI/FetchX509SVID",
        ));
        block2.extend(literal_without_indexing(1, b"/tmp/x.sock"));
        block2.extend([0x80 | 62; 5]); // x-big, from the dynamic table
        let mut second = request("localhost");
        second.truncate(4);
        second.extend(std::iter::repeat_n(big, 5));
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block1),
            frame(TYPE_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 3, &block2),
        ]);

        let frames = parse_output(&rewrite_in_chunks(input, 1500).await.unwrap());

        let on_3: Vec<_> = frames.iter().filter(|f| f.stream_id == 3).collect();
        assert_eq!(on_3.len(), 2);
        assert_eq!(on_3[0].kind, TYPE_HEADERS);
        assert_eq!(on_3[0].flags, FLAG_END_STREAM);
        assert_eq!(on_3[0].payload.len(), MAX_FRAME_PAYLOAD);
        assert_eq!(on_3[1].kind, TYPE_CONTINUATION);
        assert_eq!(on_3[1].flags, FLAG_END_HEADERS);
        let blocks = decode_blocks(&frames);
        assert_eq!(blocks[1], (3, second));
    }

    #[tokio::test]
    async fn a_dynamic_table_reference_to_a_rewritten_authority_decodes_to_localhost_on_both_requests()
     {
        // loona's encoder never indexes a header whose name is in the static
        // table, so the client's blocks are written by hand: the first
        // indexes `:authority: /tmp/x.sock` (RFC 7541 §6.2.1), the second
        // refers to it as dynamic entry 62.
        let mut common = vec![0x83, 0x86]; // :method POST, :scheme http
        common.extend(literal_without_indexing(
            4,
            b"/SpiffeWorkloadAPI/FetchX509SVID",
        ));
        let mut block1 = common.clone();
        block1.extend([0x40 | 1, 11]);
        block1.extend(b"/tmp/x.sock");
        let mut block2 = common;
        block2.push(0x80 | 62);
        let mut client_view = Decoder::new();
        let client_headers = [client_view.decode(&block1), client_view.decode(&block2)];
        for headers in client_headers {
            assert_eq!(authority_of(&headers.unwrap()), b"/tmp/x.sock");
        }
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block1),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block2),
        ]);

        let blocks = decode_blocks(&parse_output(&rewrite(input).await.unwrap()));

        let mut expected = request("localhost");
        expected.truncate(4);
        assert_eq!(blocks, vec![(1, expected.clone()), (3, expected)]);
    }

    #[tokio::test]
    async fn every_re_encoded_block_decodes_on_its_own_because_the_dynamic_table_is_never_used() {
        let mut encoder = Encoder::new();
        let input = with_preface(&[
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &encode(&mut encoder, &request("a")),
            ),
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                3,
                &encode(&mut encoder, &request("a")),
            ),
        ]);

        let frames = parse_output(&rewrite(input).await.unwrap());

        for f in &frames {
            let headers = Decoder::new().decode(&f.payload).unwrap();
            assert_eq!(headers, request("a"));
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_left_unchanged() {
        for authority in [
            "localhost",
            "example.org:443",
            "127.0.0.1:8080",
            "[::1]:50051",
        ] {
            let block = encode(&mut Encoder::new(), &request(authority));
            let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);

            let blocks = decode_blocks(&parse_output(&rewrite(input).await.unwrap()));

            assert_eq!(blocks, vec![(1, request(authority))]);
        }
    }

    #[tokio::test]
    async fn invalid_authorities_become_localhost() {
        for authority in ["/run/sigil/workload.sock", "unix:/tmp/s", "a b", ""] {
            let block = encode(&mut Encoder::new(), &request(authority));
            let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);

            let blocks = decode_blocks(&parse_output(&rewrite(input).await.unwrap()));

            assert_eq!(authority_of(&blocks[0].1), b"localhost", "{authority:?}");
        }
    }

    #[tokio::test]
    async fn the_preface_and_non_header_frames_pass_through_byte_for_byte() {
        let input = with_preface(&[
            frame(SETTINGS, 0, 0, &[0, 4, 0, 0x40, 0, 0, 0, 2, 0, 0, 0, 0]),
            frame(SETTINGS, 0x1, 0, &[]),
            frame(WINDOW_UPDATE, 0, 0, &[0, 0x0f, 0, 0x01]),
            frame(PING, 0, 0, b"12345678"),
            frame(DATA, 0x1, 1, &[0x5a; 40_000]),
            frame(0xfe, 0xff, 7, b"unknown frame types pass too"),
        ]);

        let output = rewrite_in_chunks(input.clone(), 3000).await.unwrap();

        assert_eq!(output, input);
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_preface_pass_through_untouched() {
        let mut input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        input.extend(frame(TYPE_CONTINUATION, 0, 1, b"\xff\xff\xff"));
        let mut near_miss = PREFACE[..20].to_vec();
        near_miss.extend(b"XX\r\n");
        near_miss.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, b"\xff\xff"));

        for input in [input, near_miss] {
            assert_eq!(rewrite(input.clone()).await.unwrap(), input);
        }
    }

    #[tokio::test]
    async fn the_priority_fields_of_a_headers_frame_are_preserved() {
        let priority = [0x80, 0, 0, 0x01, 0xc8]; // exclusive, depends on 1, weight 201
        let block = encode(&mut Encoder::new(), &request("/tmp/x.sock"));
        let mut payload = vec![2];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0, 0]);
        let flags = FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS;
        let input = with_preface(&[frame(TYPE_HEADERS, flags, 5, &payload)]);

        let frames = parse_output(&rewrite(input).await.unwrap());

        assert_eq!(
            frames[0].flags,
            FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS
        );
        assert_eq!(frames[0].payload[..PRIORITY_LEN], priority);
        let blocks = decode_blocks(&frames);
        assert_eq!(blocks, vec![(5, with_authority(request("x"), "localhost"))]);
    }

    #[tokio::test]
    async fn a_client_dynamic_table_size_update_is_consumed_by_the_decoder() {
        let mut encoder = Encoder::new();
        let mut block1 = vec![0x20 | 0x1f, 0x81, 0x0f]; // size update to 31 + 1921 = 1952
        block1.extend(encode(&mut encoder, &request("/tmp/x.sock")));
        encoder.set_max_table_size(1952);
        let block2 = encode(&mut encoder, &request("/tmp/x.sock"));
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block1),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block2),
        ]);

        let frames = parse_output(&rewrite(input).await.unwrap());

        assert!(
            frames.iter().all(|f| f.payload[0] & 0xe0 != 0x20),
            "no size update sent"
        );
        let expected = with_authority(request("x"), "localhost");
        assert_eq!(
            decode_blocks(&frames),
            vec![(1, expected.clone()), (3, expected)]
        );
    }

    #[tokio::test]
    async fn a_dynamic_table_size_update_past_4096_is_an_io_error() {
        let mut block = vec![0x20 | 0x1f, 0xe2, 0x3f]; // 31 + 8161 = 8192
        block.extend(encode(&mut Encoder::new(), &request("a")));
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);

        assert_invalid_data(rewrite(input).await, "HPACK decoding");
    }

    #[tokio::test]
    async fn a_continuation_frame_without_a_preceding_headers_frame_is_an_io_error() {
        let input = with_preface(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82])]);

        assert_invalid_data(rewrite(input).await, "without a preceding HEADERS");
    }

    #[tokio::test]
    async fn a_continuation_frame_for_another_stream_is_an_io_error() {
        let input = with_preface(&[
            frame(TYPE_HEADERS, 0, 1, &[0x82]),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[0x84]),
        ]);

        assert_invalid_data(rewrite(input).await, "inside the header block of stream 1");
    }

    #[tokio::test]
    async fn another_frame_inside_a_header_block_is_an_io_error() {
        for interloper in [
            frame(DATA, 0, 1, b"x"),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &[0x82]),
        ] {
            let input = with_preface(&[frame(TYPE_HEADERS, 0, 1, &[0x82]), interloper]);

            assert_invalid_data(rewrite(input).await, "inside the header block");
        }
    }

    #[tokio::test]
    async fn padding_longer_than_the_payload_is_an_io_error() {
        for (flags, payload) in [
            (FLAG_PADDED, vec![5, 0x82, 0, 0, 0]),
            (FLAG_PADDED | FLAG_PRIORITY, vec![1, 0, 0, 0, 0, 16]),
            (FLAG_PADDED, vec![]),
        ] {
            let flags = flags | FLAG_END_HEADERS;
            let input = with_preface(&[frame(TYPE_HEADERS, flags, 1, &payload)]);

            assert_invalid_data(rewrite(input).await, "pad");
        }
    }

    #[tokio::test]
    async fn a_headers_frame_too_short_for_its_priority_fields_is_an_io_error() {
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_PRIORITY, 1, &[0, 0])]);

        assert_invalid_data(rewrite(input).await, "PRIORITY");
    }

    #[tokio::test]
    async fn a_header_block_larger_than_64_kib_is_an_io_error() {
        let chunk = vec![0u8; MAX_FRAME_PAYLOAD];
        let mut frames = vec![frame(TYPE_HEADERS, 0, 1, &chunk)];
        frames.extend((0..4).map(|_| frame(TYPE_CONTINUATION, 0, 1, &chunk)));

        let result = rewrite_in_chunks(with_preface(&frames), 5000).await;

        assert_invalid_data(result, "larger than 65536 bytes");
        let mut one_frame = with_preface(&[]);
        one_frame.extend([0x01, 0x00, 0x01, TYPE_HEADERS, 0, 0, 0, 0, 1]); // 65537 bytes
        assert_invalid_data(rewrite(one_frame).await, "larger than 65536 bytes");
    }

    #[tokio::test]
    async fn a_block_with_more_than_512_fields_is_an_io_error() {
        let fields = |n| with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &vec![0x82; n])]);

        let accepted = decode_blocks(&parse_output(&rewrite(fields(512)).await.unwrap()));

        assert_eq!(accepted[0].1.len(), 512);
        assert_invalid_data(rewrite(fields(513)).await, "more than 512 fields");
    }

    #[tokio::test]
    async fn undecodable_hpack_is_an_io_error() {
        for block in [&[0xff, 0xff, 0xff, 0x7f][..], &[0x40, 0x7f], &[0x82, 0x20]] {
            let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, block)]);

            assert_invalid_data(rewrite(input).await, "HPACK decoding");
        }
    }

    #[tokio::test]
    async fn a_block_that_decodes_to_more_than_64_kib_is_an_io_error() {
        let big = ("x-big".as_bytes().to_vec(), vec![b'v'; 4000]);
        let mut encoder = Encoder::new();
        let block1 = encode(&mut encoder, &vec![big.clone()]);
        let block2 = encode(&mut encoder, &vec![big; 20]);
        let input = with_preface(&[
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block1),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block2),
        ]);

        assert_invalid_data(rewrite(input).await, "decodes to more than");
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_a_header_block_is_an_unexpected_eof() {
        let block = encode(&mut Encoder::new(), &request("a"));
        let whole = with_preface(&[frame(TYPE_HEADERS, 0, 1, &block)]);
        let partial = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);

        for input in [
            whole,
            partial[..partial.len() - 1].to_vec(),
            PREFACE[..7].to_vec(),
        ] {
            let err = rewrite(input).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[tokio::test]
    async fn reads_after_an_error_keep_failing() {
        let input = with_preface(&[
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]),
            frame(PING, 0, 0, b"12345678"),
        ]);
        let mut fix = AuthorityFix::new(Trickle::new(input, 7));
        let mut out = Vec::new();

        assert!(fix.read_to_end(&mut out).await.is_err());
        assert!(fix.read_to_end(&mut out).await.is_err());
        assert_eq!(out, PREFACE);
    }

    #[tokio::test]
    async fn random_frames_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        let kinds = [DATA, TYPE_HEADERS, TYPE_CONTINUATION, SETTINGS, 0x2];
        for _ in 0..2000 {
            let frames: Vec<_> = (0..next(5) + 1)
                .map(|_| {
                    let payload: Vec<u8> = (0..next(40)).map(|_| next(256) as u8).collect();
                    let kind = kinds[next(kinds.len())];
                    frame(kind, next(256) as u8, next(3) as u32, &payload)
                })
                .collect();
            let mut input = with_preface(&frames);
            input.truncate(input.len() - next(3));
            let _ = rewrite(input).await;
        }
    }

    #[tokio::test]
    async fn writes_pass_through_to_the_inner_stream() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut fix = AuthorityFix::new(ours);

        fix.write_all(b"server to client").await.unwrap();
        fix.flush().await.unwrap();
        fix.shutdown().await.unwrap();

        let mut received = Vec::new();
        theirs.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"server to client");
    }

    #[tokio::test]
    async fn the_peer_credentials_of_the_inner_unix_stream_survive_the_wrapping() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let expected = ours.peer_cred().unwrap();

        let info = AuthorityFix::new(ours).connect_info();

        let cred = info.peer_cred.unwrap();
        fn servable_by_tonic<T>()
        where
            T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
            T: Connected<ConnectInfo = tonic::transport::server::UdsConnectInfo>,
        {
        }
        servable_by_tonic::<AuthorityFix<UnixStream>>();
        assert_eq!(cred.uid(), expected.uid());
        assert_eq!(cred.gid(), expected.gid());
        assert_eq!(cred.pid(), expected.pid());
    }

    /// What tonic's server answered to stream 1.
    #[derive(Debug)]
    enum Answer {
        Reset(u32),
        Headers(HeaderList),
    }

    /// Serves one connection with tonic (no services, so every call is
    /// `UNIMPLEMENTED`) and sends it one raw request on stream 1.
    async fn call_tonic(authority: &str, with_adapter: bool) -> Answer {
        let (mut client, server) = UnixStream::pair().unwrap();
        let served = if with_adapter {
            tokio::spawn(serve_one(AuthorityFix::new(server)))
        } else {
            tokio::spawn(serve_one(server))
        };
        let block = encode(&mut Encoder::new(), &request(authority));
        let flags = FLAG_END_STREAM | FLAG_END_HEADERS;
        let input = with_preface(&[
            frame(SETTINGS, 0, 0, &[]),
            frame(TYPE_HEADERS, flags, 1, &block),
        ]);
        client.write_all(&input).await.unwrap();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), read_answer(client));
        let answer = answer.await.unwrap();
        served.abort();
        answer
    }

    async fn serve_one<IO>(io: IO)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        use tokio_stream::StreamExt;
        let incoming = tokio_stream::iter([Ok::<_, io::Error>(io)]).chain(tokio_stream::pending());
        let _ = tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming)
            .await;
    }

    async fn read_answer(mut client: UnixStream) -> Answer {
        let mut received = BytesMut::new();
        let mut decoder = Decoder::new();
        loop {
            assert_ne!(client.read_buf(&mut received).await.unwrap(), 0, "closed");
            for f in take_frames(&mut received) {
                match (f.kind, f.stream_id) {
                    (TYPE_HEADERS, 1) => {
                        assert_ne!(f.flags & FLAG_END_HEADERS, 0);
                        return Answer::Headers(decoder.decode(&f.payload).unwrap());
                    }
                    (RST_STREAM, 1) => {
                        let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                        return Answer::Reset(code);
                    }
                    _ => {}
                }
            }
        }
    }

    #[tokio::test]
    async fn without_the_adapter_tonic_resets_a_call_whose_authority_is_a_socket_path() {
        let answer = call_tonic("/tmp/sock", false).await;

        assert!(matches!(answer, Answer::Reset(0x1)), "{answer:?}"); // PROTOCOL_ERROR
    }

    #[tokio::test]
    async fn with_the_adapter_tonic_answers_a_call_whose_authority_is_a_socket_path() {
        let answer = call_tonic("/tmp/sock", true).await;

        let Answer::Headers(headers) = answer else {
            panic!("expected response headers, got {answer:?}");
        };
        let get = |name: &[u8]| headers.iter().find(|(n, _)| n.as_slice() == name).cloned();
        assert_eq!(get(b":status").unwrap().1, b"200");
        assert_eq!(get(b"grpc-status").unwrap().1, b"12"); // UNIMPLEMENTED: routed
    }
}
