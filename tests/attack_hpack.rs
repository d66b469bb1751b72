//! Issue 11, section 2: CPU exhaustion before attestation through HPACK.
//!
//! A uid that matches no entry (`nobody`) sends, on 4 connections, header
//! blocks of 480 literal fields whose empty name and value are flagged as
//! Huffman-coded (3 bytes a field, ~1.5 KB a block), as fast as the socket
//! takes them. Meanwhile this process (entitled as entry `tester`) fetches
//! its SVID over a new connection again and again; its p99 latency must stay
//! under 100 ms. The test prints the CPU this process used (the daemon runs
//! in it) per KiB of headers the attacker sent.
//!
//! Alone in its test binary: it measures the whole process's CPU.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Attacker, cannot_run_as_nobody, config_for_me, first_x509, process_cpu, raw_client,
    start_reachable,
};

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(6);
/// The p99 a legitimate fetch must stay under during the flood.
const P99_BUDGET: Duration = Duration::from_millis(100);
/// A fetch that takes longer than this counts as this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// One legitimate fetch on a new connection: connect, FetchX509SVID, first
/// message. Returns how long it took (capped at [`FETCH_TIMEOUT`]).
async fn timed_fetch(socket: &std::path::Path) -> Duration {
    let started = Instant::now();
    let fetch = async {
        let mut client = raw_client(socket).await;
        first_x509(&mut client).await
    };
    match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(response) => assert_eq!(response.svids.len(), 1),
        Err(_) => eprintln!("a legitimate fetch timed out after {FETCH_TIMEOUT:?}"),
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_fetch_stays_under_100_ms_p99_while_an_unentitled_uid_floods_hpack_blocks() {
    if let Some(why) = cannot_run_as_nobody() {
        eprintln!("skipped: {why}");
        return;
    }
    let daemon = start_reachable(&config_for_me("")).await;
    // Warm up: the first fetch attests and mints.
    timed_fetch(&daemon.socket).await;
    let mut quiet = Vec::new();
    for _ in 0..10 {
        quiet.push(timed_fetch(&daemon.socket).await);
    }
    quiet.sort();
    println!(
        "without the flood: p50 {:?}, p99 {:?} over {} fetches",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet.len()
    );

    let socket = daemon.socket.to_string_lossy().into_owned();
    let secs = FLOOD.as_secs().to_string();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut attacker = Attacker::spawn(
        &daemon,
        true,
        &[
            "hpack",
            &socket,
            "--connections",
            "4",
            "--secs",
            &secs,
            "--fields",
            "480",
        ],
    );
    // Let the four connections get going (python starts in ~50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    while started.elapsed() < FLOOD {
        latencies.push(timed_fetch(&daemon.socket).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = attacker.json(FLOOD + Duration::from_secs(30)).await;
    let wall = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    drop(attacker);

    latencies.sort();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    let sent_kib = report["bytes_sent"].as_f64().unwrap_or(0.0) / 1024.0;
    println!("attacker: {report}");
    println!(
        "during the flood: {} fetches, p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies.len(),
        latencies.last().unwrap()
    );
    println!(
        "process CPU {cpu:?} over {wall:?} wall ({:.0}% of one core); {sent_kib:.0} KiB of header blocks sent: {:.3} ms CPU per KiB",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        if sent_kib > 0.0 {
            cpu.as_secs_f64() * 1000.0 / sent_kib
        } else {
            f64::NAN
        }
    );
    assert!(sent_kib > 0.0, "the flood ran: {report}");
    assert!(
        p99 < P99_BUDGET,
        "a legitimate fetch took {p99:?} at p99 (p50 {p50:?}, {} fetches) while nobody flooded HPACK blocks",
        latencies.len()
    );
    daemon.stop().await;
}
