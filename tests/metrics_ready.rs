//! `/readyz` says what is wrong: it turns unready while the store cannot
//! take a write (its page quota exhausted, as on a full disk) and ready
//! again once it can (an answer is reused for a second, so it polls). The daemon runs in process so the test can fill its
//! store; it is alone in this binary (the daemon counts in the process's
//! metrics).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{TestDaemon, config_for_me};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_the_store_is_not_writable_and_ready_again_after() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let daemon =
        TestDaemon::start_with(&config_for_me(&format!("[metrics]\nlisten = \"{addr}\""))).await;
    let ready = get(addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let pages = daemon.store().page_count().unwrap();
    daemon.store().limit_pages(pages).unwrap();
    // An answer is reused for a second; a later one sees the full store.
    let unready = until(addr, "HTTP/1.1 503").await;
    assert!(unready.contains("the store is not writable"), "{unready}");
    let live = get(addr, "/livez").await;
    assert!(live.starts_with("HTTP/1.1 200"), "still live: {live}");

    daemon.store().limit_pages(0).unwrap();
    until(addr, "HTTP/1.1 200").await;
    daemon.stop().await;
}

/// Asks `/readyz` until its answer starts with `status` (within 5 s).
async fn until(addr: std::net::SocketAddr, status: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = get(addr, "/readyz").await;
        if answer.starts_with(status) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{status} expected: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
