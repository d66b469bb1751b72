//! Issue 11, section 3: connections held open without limit.
//!
//! - A flood: `nobody` opens `max_connections_per_uid + 50` connections and
//!   holds them; the daemon keeps serving this process (another uid) and
//!   closes nobody's connections beyond the cap promptly.
//! - Idle: a connection that sends nothing, or only the preface, is closed
//!   once `handshake_timeout` passes.
//! - Slowloris: a HEADERS frame trickled at one byte a second after the
//!   preface is closed by the same timeout.
//!
//! The configs carry issue 11's new `[workload_api]` keys; set
//! `SIGIL_ATTACK_LEGACY_CONFIG=1` to leave them out and watch the attacks
//! succeed against a daemon without the limits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Attacker, cannot_run_as_nobody, config_for_me, first_x509, limits, raw_client, start_reachable,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
/// The per-uid cap the flood test configures.
const CAP: usize = 50;

/// Reads until the daemon closes the connection (EOF or an error such as
/// ECONNRESET), up to `limit`; returns how long that took, or `None` if the
/// connection was still open at the limit.
async fn time_to_close(
    stream: &mut UnixStream,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => continue, // the daemon's SETTINGS and the like
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()
}

/// A HEADERS frame (END_HEADERS) for FetchX509SVID on stream 1, HPACK
/// literals without indexing.
fn fetch_headers_frame() -> Vec<u8> {
    headers_frame("/SpiffeWorkloadAPI/FetchX509SVID")
}

/// A HEADERS frame (END_HEADERS) for a gRPC call to `path` on stream 1.
fn headers_frame(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        block.push(0);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    let len = u32::try_from(block.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], 0x1, 0x4, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_connections_over_the_per_uid_cap_are_closed_and_another_uid_is_still_served() {
    if let Some(why) = cannot_run_as_nobody() {
        eprintln!("skipped: {why}");
        return;
    }
    // A long handshake timeout, so only the cap can close connections here.
    let config = config_for_me(&limits(&format!(
        "[workload_api]\nmax_connections_per_uid = {CAP}\nhandshake_timeout = \"60s\"\nidle_timeout = \"60s\"\n"
    )));
    let daemon = start_reachable(&config).await;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let count = (CAP + 50).to_string();
    let mut attacker = Attacker::spawn(
        &daemon,
        true,
        &["flood", &socket, "--n", &count, "--hold", "6"],
    );
    let opened = attacker.json(Duration::from_secs(20)).await;
    println!("nobody: {opened}");

    // While nobody holds them, this process (another uid) is served.
    let fetched = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = raw_client(&daemon.socket).await;
        first_x509(&mut client).await
    })
    .await;
    let served = fetched.as_ref().is_ok_and(|r| r.svids.len() == 1);

    let done = attacker.json(Duration::from_secs(30)).await;
    println!("nobody: {done}");
    assert!(
        served,
        "a legitimate fetch was served while nobody held {count} connections"
    );
    let closed_early = done["closed_within_3s"].as_u64().unwrap_or(0);
    assert!(
        closed_early >= 50,
        "the daemon closed only {closed_early} of nobody's {count} connections within 3 s (cap {CAP}): {done}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_or_only_the_preface_is_closed_after_the_handshake_timeout()
{
    let config = config_for_me(&limits("[workload_api]\nhandshake_timeout = \"2s\"\n"));
    let daemon = start_reachable(&config).await;
    let started = Instant::now();
    let mut silent = UnixStream::connect(&daemon.socket).await.unwrap();
    let mut preface_only = UnixStream::connect(&daemon.socket).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    let limit = Duration::from_secs(6);
    let (silent_closed, preface_closed) = tokio::join!(
        time_to_close(&mut silent, started, limit),
        time_to_close(&mut preface_only, started, limit)
    );
    println!(
        "silent connection closed after {silent_closed:?}, preface-only after {preface_closed:?}"
    );
    let bound = Duration::from_millis(3500);
    assert!(
        silent_closed.is_some_and(|t| t < bound),
        "a connection that sent nothing was still open after {:?}",
        silent_closed.unwrap_or(limit)
    );
    assert!(
        preface_closed.is_some_and(|t| t < bound),
        "a connection that sent only the preface was still open after {:?}",
        preface_closed.unwrap_or(limit)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_trickling_a_headers_frame_at_one_byte_a_second_is_closed() {
    let config = config_for_me(&limits("[workload_api]\nhandshake_timeout = \"2s\"\n"));
    let daemon = start_reachable(&config).await;
    let stream = UnixStream::connect(&daemon.socket).await.unwrap();
    let (mut read_half, mut write_half) = stream.into_split();
    write_half.write_all(PREFACE).await.unwrap();
    write_half.write_all(SETTINGS).await.unwrap();
    let started = Instant::now();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let trickle = tokio::spawn(async move {
        for byte in fetch_headers_frame() {
            if write_half.write_all(&[byte]).await.is_err() {
                break; // EPIPE / ECONNRESET: the daemon hung up
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let limit = Duration::from_secs(8);
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match read_half.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok();
    trickle.abort();
    let written = written.load(std::sync::atomic::Ordering::Relaxed);
    println!("slowloris closed after {closed:?} ({written} bytes of the HEADERS frame trickled)");
    assert!(
        closed.is_some_and(|t| t < Duration::from_millis(4500)),
        "a connection trickling one byte a second was still open after {:?}",
        closed.unwrap_or(limit)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_without_streams_after_a_call_is_closed_after_the_idle_timeout() {
    let config = config_for_me(&limits(
        "[workload_api]\nhandshake_timeout = \"2s\"\nidle_timeout = \"2s\"\n",
    ));
    let daemon = start_reachable(&config).await;
    let mut stream = UnixStream::connect(&daemon.socket).await.unwrap();
    // One complete unary call (the task extension's List), then silence.
    let mut call = PREFACE.to_vec();
    call.extend_from_slice(SETTINGS);
    call.extend_from_slice(&headers_frame("/sigil.workload.v1.Tasks/List"));
    call.extend_from_slice(&[0, 0, 5, 0, 0x1, 0, 0, 0, 1, 0, 0, 0, 0, 0]); // DATA, END_STREAM
    stream.write_all(&call).await.unwrap();
    let started = Instant::now();
    // The answer first: a DATA frame (the ListResponse), then the trailers.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            // Any frame on stream 1 (HEADERS or DATA) means the call ran.
            if frames_on_stream_1(&answer) {
                break;
            }
        }
    })
    .await;
    assert!(
        answered.is_ok() && frames_on_stream_1(&answer),
        "the List call was answered ({} bytes read)",
        answer.len()
    );
    let limit = Duration::from_secs(7);
    let closed = time_to_close(&mut stream, started, limit).await;
    println!("a connection idle after one call was closed after {closed:?}");
    assert!(
        closed.is_some_and(|t| t < Duration::from_millis(4500)),
        "a connection with no stream open was still open after {:?} (idle_timeout 2s)",
        closed.unwrap_or(limit)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_svid_stream_keeps_its_connection_past_the_idle_and_handshake_timeouts() {
    use tokio_stream::StreamExt;
    // The other side of the limits: a legitimate agent keeps one
    // FetchX509SVID stream open for as long as it runs.
    let config = config_for_me(&limits(
        "[workload_api]\nhandshake_timeout = \"1s\"\nidle_timeout = \"1s\"\n",
    ));
    let daemon = start_reachable(&config).await;
    let mut client = raw_client(&daemon.socket).await;
    let mut svids = client
        .fetch_x509svid(common::with_header(
            sigil::proto::workload::X509svidRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    svids.next().await.unwrap().unwrap();
    let next = tokio::time::timeout(Duration::from_secs(4), svids.next()).await;
    assert!(
        next.is_err(),
        "the stream of a legitimate agent ended or errored within 4 s: {next:?}"
    );
    daemon.stop().await;
}

/// Whether the frames in `bytes` include one on stream 1.
fn frames_on_stream_1(bytes: &[u8]) -> bool {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        if bytes[at + 5..at + 9] == [0, 0, 0, 1] {
            return true;
        }
        at += 9 + len;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_gets_at_most_max_streams_per_instance_answered_across_connections() {
    if !std::path::Path::new(common::ATTACK_PYTHON).exists() {
        eprintln!("skipped: {} is missing", common::ATTACK_PYTHON);
        return;
    }
    // 8 connections x 24 streams: under the per-connection cap (32), over
    // the per-instance one (128).
    let config = config_for_me(&limits(
        "[workload_api]\nmax_streams_per_connection = 32\nmax_streams_per_instance = 128\n",
    ));
    let daemon = start_reachable(&config).await;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let report = common::run_attack(
        &daemon,
        false,
        &[
            "instance-streams",
            &socket,
            "--connections",
            "8",
            "--n",
            "24",
            "--secs",
            "4",
        ],
        Duration::from_secs(30),
    )
    .await;
    println!("one instance, 192 streams: {report}");
    let answered = report["svid_streams"].as_u64().unwrap();
    assert!(answered > 0, "the instance was served at all: {report}");
    assert!(
        answered <= 128,
        "{answered} streams of one instance were answered with an SVID (max_streams_per_instance = 128)"
    );
    daemon.stop().await;
}
