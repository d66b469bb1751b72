//! Issue 11, section 3: idle connections that exhaust the daemon's file
//! descriptors lock every other client out.
//!
//! The daemon runs in this process, whose soft `RLIMIT_NOFILE` the test
//! lowers to 400 first (as a distribution's default 1024 would be, scaled
//! down); `nobody` then opens 450 idle connections. Another uid (this
//! process) must still be served: through the per-uid connection cap, the
//! soft limit raised to the hard one at start, or both.
//!
//! Alone in its test binary: it changes the whole process's fd limit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{Attacker, cannot_run_as_nobody, config_for_me, start_reachable};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft fd limit the daemon starts under.
const SOFT_LIMIT: u64 = 400;
/// How many idle connections nobody opens: more than the daemon can accept.
const CONNECTIONS: &str = "450";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_nobody_up_to_the_fd_limit_do_not_lock_out_another_uid() {
    if let Some(why) = cannot_run_as_nobody() {
        eprintln!("skipped: {why}");
        return;
    }
    let original = getrlimit(Resource::Nofile);
    if original.maximum.is_some_and(|hard| hard <= SOFT_LIMIT) {
        eprintln!("skipped: the hard fd limit {original:?} is too low to test with");
        return;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(SOFT_LIMIT),
            maximum: original.maximum,
        },
    )
    .unwrap();
    let daemon = start_reachable(&config_for_me("")).await;
    println!(
        "fd limit once the daemon started: {:?}",
        getrlimit(Resource::Nofile)
    );
    let socket = daemon.socket.to_string_lossy().into_owned();
    let mut legitimate = Attacker::spawn(&daemon, false, &["fetch", &socket, "--wait"]);
    let mut attacker = Attacker::spawn(
        &daemon,
        true,
        &["flood", &socket, "--n", CONNECTIONS, "--hold", "8"],
    );
    let opened = attacker.json(Duration::from_secs(30)).await;
    println!("nobody: {opened}");
    // Let the daemon accept what it can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The legitimate client is another process (this one shares the
    // daemon's fd limit), started before the flood and told to go now. It
    // runs as this test's uid (entry `tester`).
    let started = std::time::Instant::now();
    legitimate.say("go");
    let fetched = legitimate.json(Duration::from_secs(15)).await;
    let took = started.elapsed();
    let done = attacker.json(Duration::from_secs(30)).await;
    drop(attacker);
    println!("nobody: {done}");
    println!("the legitimate fetch after {took:?}: {fetched}");
    assert_eq!(
        fetched["got_svid"], true,
        "a legitimate fetch was not served while nobody held {CONNECTIONS} idle connections: {fetched}"
    );
    daemon.stop().await;
    setrlimit(Resource::Nofile, original).unwrap();
}
