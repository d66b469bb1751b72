//! Unit tests of the `:authority` repair adapter and its rewriter.

use bytes::Bytes;
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::rewriter::*;
use super::*;

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

#[tokio::test]
async fn a_request_written_within_the_watched_bytes_is_reported_and_one_after_is_not() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let settings = frame(0x4, 0, 0, &[]);
    let block = encode(&mut Encoder::new(), &request("localhost"));
    let headers = frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block);
    let input = with_preface(&[settings.clone(), headers]);
    let before_headers = (PREFACE.len() + settings.len()) as u64;
    for (limit, expected) in [
        (0, false),
        (before_headers, false),
        (before_headers + 1, true),
        (u64::MAX, true),
    ] {
        let seen = Arc::new(AtomicBool::new(false));
        let flag = seen.clone();
        let mut fix = AuthorityFix::new(Trickle::new(input.clone(), 5))
            .watching_early_headers(limit, move || flag.store(true, Ordering::Release));
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(seen.load(Ordering::Acquire), expected, "limit {limit}");
    }
}
