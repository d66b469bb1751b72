//! The Workload API over the real socket: the header rule, attestation by
//! uid and digest, one identity per instance, and restarts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{TestDaemon, config_for_me, raw_client, with_header};
use sha2::{Digest, Sha256};
use sigil::proto::workload::{X509BundlesRequest, X509svidRequest};
use tokio_stream::StreamExt;

fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn my_exe_digest() -> String {
    let exe = std::fs::read("/proc/self/exe").unwrap();
    hex::encode(Sha256::digest(exe))
}

fn config_with_selectors(selectors: &[String]) -> String {
    let list: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"only\"\nselectors = [{}]\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn a_request_without_the_security_header_is_an_invalid_argument() {
    let daemon = TestDaemon::start().await;
    let mut client = raw_client(&daemon.socket).await;
    let status = client
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    let status = client
        .fetch_x509_bundles(tonic::Request::new(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    daemon.stop().await;
}

#[tokio::test]
async fn a_caller_matching_no_entry_is_denied_with_no_identity_issued() {
    let other_uid = my_uid().wrapping_add(4242);
    let daemon =
        TestDaemon::start_with(&config_with_selectors(&[format!("unix:uid:{other_uid}")])).await;
    let mut client = raw_client(&daemon.socket).await;
    let status = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("no identity issued"),
        "{}",
        status.message()
    );
    let status = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(daemon.identity().instances().is_empty());
    daemon.stop().await;
}

/// FetchX509Bundles attests the caller and checks it is entitled, but
/// starts no instance and mints nothing: no instance, SVID or issuance row.
#[tokio::test]
async fn fetching_the_bundle_mints_nothing_and_starts_no_instance() {
    let daemon = TestDaemon::start().await;
    let mut client = raw_client(&daemon.socket).await;
    let mut stream = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.bundles.is_empty(), "the bundle is sent");
    assert!(daemon.identity().instances().is_empty());
    assert!(daemon.store().live_instances().unwrap().is_empty());
    let issued = daemon
        .store()
        .audit(&sigil::store::AuditQuery {
            kind: Some(sigil::store::AuditKind::Issuance),
            ..Default::default()
        })
        .unwrap();
    assert!(issued.is_empty(), "nothing was minted: {issued:?}");
    drop(stream);
    daemon.stop().await;
}

#[tokio::test]
async fn an_unauthenticated_verifier_gets_the_bundle_and_crl_only_when_allowed_and_no_instance_either_way()
 {
    // The only entry admits another uid: this process is a verifier with
    // no identity of its own.
    let config = |allow: bool| {
        format!(
            "trust_domain = \"sigil.test\"\n[workload_api]\nallow_unauthenticated_verifiers = {allow}\n[[entry]]\nname = \"others\"\nselectors = [\"unix:uid:4242\"]\n"
        )
    };
    let daemon = TestDaemon::start_with(&config(true)).await;
    let mut client = raw_client(&daemon.socket).await;
    let first = common::first_bundles(&mut client).await;
    assert!(
        first.bundles.contains_key("spiffe://sigil.test"),
        "{:?}",
        first.bundles.keys()
    );
    assert_eq!(first.crl.len(), 1, "the CRL comes with the bundle");
    let svid = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(svid.code(), tonic::Code::PermissionDenied, "still no SVID");
    assert!(daemon.identity().instances().is_empty());
    assert!(daemon.store().live_instances().unwrap().is_empty());
    daemon.stop().await;

    let daemon = TestDaemon::start_with(&config(false)).await;
    let refused = raw_client(&daemon.socket)
        .await
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("no identity issued"),
        "{}",
        refused.message()
    );
    assert!(daemon.identity().instances().is_empty());
    assert!(daemon.store().live_instances().unwrap().is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn entries_on_uid_and_sha256_admit_this_process_and_refuse_a_wrong_digest() {
    let right = vec![
        format!("unix:uid:{}", my_uid()),
        format!("unix:sha256:{}", my_exe_digest()),
    ];
    let daemon = TestDaemon::start_with(&config_with_selectors(&right)).await;
    let mut client = raw_client(&daemon.socket).await;
    let first = common::first_x509(&mut client).await;
    assert_eq!(first.svids.len(), 1);
    assert!(
        first.svids[0]
            .spiffe_id
            .starts_with("spiffe://sigil.test/agent/only/instance/")
    );
    daemon.stop().await;

    let wrong = vec![
        format!("unix:uid:{}", my_uid()),
        format!("unix:sha256:{}", "0".repeat(64)),
    ];
    let daemon = TestDaemon::start_with(&config_with_selectors(&wrong)).await;
    let mut client = raw_client(&daemon.socket).await;
    let status = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    daemon.stop().await;
}

#[tokio::test]
async fn every_stream_of_one_process_gets_the_same_svid() {
    let daemon = TestDaemon::start().await;
    let mut serials = Vec::new();
    for _ in 0..3 {
        // A fresh connection each time, as the rust X509Source does.
        let mut client = raw_client(&daemon.socket).await;
        let response = common::first_x509(&mut client).await;
        serials.push(response.svids[0].x509_svid.clone());
    }
    assert_eq!(serials[0], serials[1]);
    assert_eq!(serials[1], serials[2]);
    assert_eq!(daemon.identity().instances().len(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn a_process_matching_two_entries_gets_two_svids_instance_first() {
    let toml = format!(
        "{}[[entry]]\nname = \"second\"\nselectors = [\"unix:uid:{}\"]\nspiffe_id = \"spiffe://{{trust_domain}}/uid/{{uid}}\"\n",
        config_for_me(""),
        my_uid()
    );
    let daemon = TestDaemon::start_with(&toml).await;
    let mut client = raw_client(&daemon.socket).await;
    let response = common::first_x509(&mut client).await;
    let ids: Vec<_> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    let hints: Vec<_> = response.svids.iter().map(|s| s.hint.as_str()).collect();
    assert!(ids[0].starts_with("spiffe://sigil.test/agent/tester/instance/"));
    assert_eq!(ids[1], format!("spiffe://sigil.test/uid/{}", my_uid()));
    assert_eq!(hints, ["instance", "entry:second"]);
    daemon.stop().await;
}

#[tokio::test]
async fn the_bundle_stream_carries_the_trust_domain_ca() {
    let daemon = TestDaemon::start().await;
    let mut client = raw_client(&daemon.socket).await;
    let response = common::first_bundles(&mut client).await;
    let der = response
        .bundles
        .get("spiffe://sigil.test")
        .expect("own trust domain");
    let (_, ca) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(ca.is_ca());
    daemon.stop().await;
}

#[tokio::test]
async fn a_restarted_daemon_serves_the_same_bundle() {
    async fn bundle(daemon: &TestDaemon) -> Vec<u8> {
        let mut client = raw_client(&daemon.socket).await;
        let response = common::first_bundles(&mut client).await;
        response.bundles["spiffe://sigil.test"].to_vec()
    }
    let daemon = TestDaemon::start().await;
    let before = bundle(&daemon).await;
    let dir = daemon.stop().await;
    let daemon = TestDaemon::start_in(dir, &config_for_me("")).await;
    assert_eq!(bundle(&daemon).await, before);
    daemon.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let daemon = TestDaemon::start().await;
    let mut client = raw_client(&daemon.socket).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let stopping = tokio::spawn(daemon.stop());
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream ended when the daemon stopped");
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_refuses_to_start() {
    let daemon = TestDaemon::start().await;
    let shutdown = sigil::shutdown::Shutdown::new();
    let overrides = sigil::config::Overrides {
        socket: Some(daemon.socket.clone()),
        state_dir: Some(daemon.dir.path().join("state2")),
        admin_socket: None,
    };
    let config = sigil::config::Config::parse(&config_for_me(""), "t", &overrides).unwrap();
    let err = sigil::app::App::build(config, &shutdown)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already serving"), "{err}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_clients_that_hang_up_do_not_disturb_others() {
    use tokio::io::AsyncWriteExt;
    let daemon = TestDaemon::start().await;
    // Not HTTP/2 at all.
    let mut junk = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    // The HTTP/2 preface, then a malformed HEADERS frame (padding longer
    // than the payload), then hang up.
    let mut bad = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    bad.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    bad.write_all(&[0, 0, 1, 0x1, 0x8 | 0x4, 0, 0, 0, 1, 200])
        .await
        .unwrap();
    drop(bad);
    // A real request whose client goes away before reading the answer.
    let mut impatient = raw_client(&daemon.socket).await;
    let call = tokio::spawn(async move {
        impatient
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
    });
    call.abort();
    // Everyone else is still served.
    let mut client = raw_client(&daemon.socket).await;
    let response = common::first_x509(&mut client).await;
    assert_eq!(response.svids.len(), 1);
    // A connection that never finishes its handshake does not hold up
    // shutdown either.
    let idle = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), daemon.stop())
        .await
        .expect("the daemon stops despite idle and junk connections");
    drop((junk, idle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthcheck_leaves_no_instance_svid_or_audit_row_behind() {
    let daemon = TestDaemon::start().await;
    let socket = daemon.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["healthcheck", "--socket", &socket])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(daemon.identity().instances().is_empty());
    assert!(
        daemon
            .store()
            .audit(&Default::default())
            .unwrap()
            .is_empty()
    );
    daemon.stop().await;
}
