//! The sans-I/O core of [`AuthorityFix`](super::AuthorityFix): HTTP/2 frame
//! parsing of the client's byte stream, HPACK decoding and re-encoding of
//! its header blocks with the `:authority` repair, and the limits that keep
//! a hostile client from making either expensive.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use loona_hpack::Encoder;

use super::hpack::{self, Decoder};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header.
pub(super) const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE default; every server accepts frames this large.
pub(super) const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The largest decoded header list (RFC 7541 sizes: name + value + 32 per
/// field) the server accepts (SETTINGS_MAX_HEADER_LIST_SIZE); it refuses
/// larger ones on its own, so we never build one larger either.
const SERVER_MAX_HEADER_LIST: usize = crate::workload_api::MAX_HEADER_LIST_BYTES as usize;
/// Largest header block fragment we buffer for one block: Huffman coding can
/// make a list up to 3.75 times longer on the wire than decoded, so blocks
/// beyond this cannot decode to a list the server would accept.
const MAX_BLOCK_FRAGMENT: usize = 4 * SERVER_MAX_HEADER_LIST;
/// Largest decoded header list we build; bounds what dynamic-table
/// references can expand a small block to. (The server refuses lists over
/// its own limit with a clean stream error, so ours is looser.)
const MAX_DECODED_LIST: usize = 4 * SERVER_MAX_HEADER_LIST;
/// Most header fields in one block: every field counts at least 32 bytes
/// against the server's list limit.
const MAX_FIELDS: usize = SERVER_MAX_HEADER_LIST / 32;
/// The HPACK table size the server advertises (h2's default); a client may
/// not grow its table past it.
const CLIENT_TABLE_SIZE_LIMIT: usize = 4096;
/// What replaces an `:authority` that is not a valid URI authority.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

pub(super) const TYPE_HEADERS: u8 = 0x1;
pub(super) const TYPE_CONTINUATION: u8 = 0x9;
pub(super) const FLAG_END_STREAM: u8 = 0x1;
pub(super) const FLAG_END_HEADERS: u8 = 0x4;
pub(super) const FLAG_PADDED: u8 = 0x8;
pub(super) const FLAG_PRIORITY: u8 = 0x20;
pub(super) const PRIORITY_LEN: usize = 5;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

pub(super) use super::hpack::HeaderList;

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
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
pub(super) struct FrameHeader {
    pub(super) length: usize,
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream_id: u32,
}

impl FrameHeader {
    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        let header: &[u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *header;
        Some(Self {
            length: (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2),
            kind,
            flags,
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_ID_MASK,
        })
    }

    pub(super) fn write(&self, out: &mut BytesMut) {
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
pub(super) struct Rewriter {
    pub(super) phase: Phase,
    pending: Option<PendingBlock>,
    decoder: Decoder,
    encoder: Encoder<'static>,
    /// Decoded header bytes not yet reported (see `take_decoded`): a small
    /// block can decode to a large list through table references, and that
    /// is the work the client makes the daemon do.
    decoded: usize,
    /// Client bytes consumed so far: the offset of the head of the input.
    consumed: u64,
    /// A HEADERS frame starting before this offset sets `early_headers`.
    early_limit: u64,
    /// Whether a HEADERS frame started before `early_limit`.
    pub(super) early_headers: bool,
}

impl Rewriter {
    pub(super) fn new() -> Self {
        let decoder = Decoder::new(CLIENT_TABLE_SIZE_LIMIT);
        // loona-hpack's encoder indexes every literal whose name is not in
        // the static table into a dynamic table (4096 bytes by default) and
        // refers back to it. A table of size 0 keeps it to static-table
        // references and literals: see the `authority` module docs for why.
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(0);
        Self {
            phase: Phase::Preface { matched: 0 },
            pending: None,
            decoder,
            encoder,
            decoded: 0,
            consumed: 0,
            early_limit: 0,
            early_headers: false,
        }
    }

    /// Consumes what it can of `input` and appends the result to `out`.
    /// After an error the rewriter stays failed.
    pub(super) fn process(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        let result = self.process_inner(input, out);
        if result.is_err() {
            self.phase = Phase::Failed;
            self.pending = None;
            input.clear();
        }
        result
    }

    /// Watches for a HEADERS frame that starts within the first `limit`
    /// bytes of the client's stream.
    pub(super) fn watch_early_headers(&mut self, limit: u64) {
        self.early_limit = limit;
    }

    /// The decoded header bytes since the last call.
    pub(super) fn take_decoded(&mut self) -> usize {
        std::mem::take(&mut self.decoded)
    }

    /// Refuses further reading once an error has been reported.
    pub(super) fn ensure_usable(&self) -> io::Result<()> {
        if self.phase == Phase::Failed {
            return Err(invalid("the HTTP/2 client stream was already rejected"));
        }
        Ok(())
    }

    fn process_inner(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            let before = input.len();
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
            self.consumed += u64::try_from(before - input.len()).unwrap_or(u64::MAX);
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Checks the end of the client's stream: ending inside a frame or a
    /// header block is an error, as `h2` would report it.
    pub(super) fn finish(&self, input: &BytesMut) -> io::Result<()> {
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
        if header.kind == TYPE_HEADERS && self.consumed < self.early_limit {
            self.early_headers = true;
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
        let limits = hpack::Limits {
            max_fields: MAX_FIELDS,
            max_list_size: MAX_DECODED_LIST,
        };
        let mut headers = self.decoder.decode(&block.fragment, limits).map_err(|e| {
            invalid(format!(
                "HPACK decoding of the client header block on stream {} failed: {e}",
                block.stream_id
            ))
        })?;
        self.decoded += headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 32)
            .sum::<usize>();
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
