//! Issue 11, section 2: one uid's bytes are read no faster than its
//! allowance (2 MiB/s after an 8 MiB burst), however it sends them, while
//! another uid is served as usual. Alone in its file: the allowance is per
//! uid, and other attack tests also run as `nobody`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{
    Attacker, cannot_run_as_nobody, config_for_me, first_x509, raw_client, start_reachable,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_sending_24_mib_is_read_at_its_allowance_and_another_uid_is_served_meanwhile() {
    if let Some(why) = cannot_run_as_nobody() {
        eprintln!("skipped: {why}");
        return;
    }
    // The timeouts must not close the bulk connection before it is read.
    let daemon = start_reachable(&config_for_me(
        "[workload_api]\nhandshake_timeout = \"120s\"\nidle_timeout = \"120s\"\n",
    ))
    .await;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let mut bulk = Attacker::spawn(&daemon, true, &["bulk", &socket, "--n", "24"]);
    // While nobody's bytes wait for their allowance, this uid is served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = raw_client(&daemon.socket).await;
    let served = tokio::time::timeout(Duration::from_secs(10), first_x509(&mut client)).await;
    assert!(served.is_ok(), "another uid was served during the flood");
    let report = bulk.json(Duration::from_secs(60)).await;
    println!("24 MiB from nobody: {report}");
    assert_eq!(report["pong"], true, "the daemon read it all: {report}");
    let seconds = report["seconds"].as_f64().unwrap();
    // 8 MiB of burst, then 16 MiB at 2 MiB/s: about 8 s; a daemon without
    // the allowance reads it in well under a second.
    assert!(
        seconds >= 5.0,
        "24 MiB were read in {seconds:.2} s, faster than 2 MiB/s after an 8 MiB burst"
    );
    daemon.stop().await;
}
