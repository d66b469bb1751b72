//! Issue 11, section 3: one connection opening streams without limit.
//!
//! An entitled client (this test's uid, entry `tester`; the raw python
//! client) opens FetchX509SVID streams on one connection, odd ids, never
//! granting flow-control window, so the daemon holds every stream and its
//! unsent answers. With `max_streams_per_connection = 32` the daemon's
//! memory must stay bounded: the test process's RSS (the daemon runs in it)
//! may grow by at most 150 MB, while the connection is open and after it
//! closes.
//!
//! Alone in its test binary: it measures the whole process's RSS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{Attacker, config_for_me, limits, start_reachable, vm_rss_kib};

/// How many streams the client opens (the attack used 100,000).
const STREAMS: &str = "100000";
/// The most the process's RSS may grow, in KiB.
const RSS_BUDGET_KIB: u64 = 150 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_streams_on_one_connection_grow_the_daemon_by_less_than_150_mb() {
    if !std::path::Path::new(common::ATTACK_PYTHON).exists() {
        eprintln!("skipped: {} is missing", common::ATTACK_PYTHON);
        return;
    }
    let config = config_for_me(&limits(
        "[workload_api]\nmax_streams_per_connection = 32\nmax_streams_per_instance = 128\n",
    ));
    let daemon = start_reachable(&config).await;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let before = vm_rss_kib();
    let mut attacker = Attacker::spawn(
        &daemon,
        false,
        &["streams", &socket, "--n", STREAMS, "--secs", "150"],
    );
    let open = attacker.json(Duration::from_secs(200)).await;
    let while_open = vm_rss_kib();
    attacker.say("close");
    let closed = attacker.json(Duration::from_secs(30)).await;
    drop(attacker);
    // Give the daemon a moment to drop the connection's streams.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_close = vm_rss_kib();
    println!("while open: {open}");
    println!("after close: {closed}");
    println!(
        "RSS before {before} KiB, with the streams open {while_open} KiB (+{} MiB), after the connection closed {after_close} KiB (+{} MiB)",
        while_open.saturating_sub(before) / 1024,
        after_close.saturating_sub(before) / 1024
    );
    assert!(
        open["streams_opened"].as_u64().unwrap_or(0) > 0,
        "the client opened streams: {open}"
    );
    assert!(
        while_open.saturating_sub(before) < RSS_BUDGET_KIB,
        "RSS grew by {} MiB with {} streams asked for on one connection",
        while_open.saturating_sub(before) / 1024,
        open["streams_opened"]
    );
    assert!(
        after_close.saturating_sub(before) < RSS_BUDGET_KIB,
        "RSS stayed {} MiB up after the connection closed",
        after_close.saturating_sub(before) / 1024
    );
    daemon.stop().await;
}
