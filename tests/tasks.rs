//! Task-bound identities over the real socket: Begin/End on the workload
//! socket, task SVIDs on the open stream, revocation pushed as a CRL (on
//! the verifiers' FetchX509Bundles stream, never on agents' SVID streams)
//! that rustls-webpki and openssl enforce, entry policy refusals, TTL
//! expiry, and what survives a daemon restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::Duration;

use common::{
    TestDaemon, config_for_me, crl_serials, raw_client, serial_of, stream_end, tasks_client,
    with_header,
};
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest, ListRequest};
use sigil::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tokio_stream::StreamExt;
use tonic::Streaming;

const SELF_DECLARE: &str = "[entry.tasks]\nself_declare = true\nmax_ttl = \"10m\"\nmax_concurrent = 2\nid_pattern = \"job-*\"";

fn config(svid: &str) -> String {
    format!("{}{SELF_DECLARE}\n", config_for_me(svid))
}

fn begin(task_id: &str, ttl_secs: i64) -> tonic::Request<BeginRequest> {
    with_header(BeginRequest {
        task_id: task_id.into(),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        attributes: [("ticket".to_owned(), "42".to_owned())].into(),
    })
}

async fn open_stream(daemon: &TestDaemon) -> Streaming<X509svidResponse> {
    raw_client(&daemon.socket)
        .await
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// A verifier's stream: the bundle and every new CRL.
async fn open_bundles(daemon: &TestDaemon) -> Streaming<X509BundlesResponse> {
    raw_client(&daemon.socket)
        .await
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Reads the bundle stream until its CRL satisfies `check` (given the
/// serials it lists), within `limit`; returns that CRL.
async fn until_crl(
    bundles: &mut Streaming<X509BundlesResponse>,
    limit: Duration,
    check: impl Fn(&[String]) -> bool,
) -> Vec<u8> {
    tokio::time::timeout(limit, async {
        loop {
            let msg = bundles.next().await.unwrap().unwrap();
            let crl = msg.crl.first().expect("every bundle message has a CRL");
            if check(&crl_serials(crl)) {
                return crl.to_vec();
            }
        }
    })
    .await
    .expect("the expected CRL arrived in time")
}

/// The next message, within a second (the bound for every push).
async fn next_within_a_second(stream: &mut Streaming<X509svidResponse>) -> X509svidResponse {
    tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("an update within one second")
        .expect("the stream is open")
        .expect("a message, not an error")
}

/// Reads SVID messages until one satisfies `check` (several changes may
/// come as one push, or one after another), for at most `limit`.
async fn until(
    stream: &mut Streaming<X509svidResponse>,
    limit: Duration,
    check: impl Fn(&X509svidResponse) -> bool,
) -> X509svidResponse {
    tokio::time::timeout(limit, async {
        loop {
            let msg = stream.next().await.unwrap().unwrap();
            if check(&msg) {
                return msg;
            }
        }
    })
    .await
    .expect("the expected update arrived in time")
}

/// webpki's verdict on `leaf` given the bundle and the CRL.
fn webpki_verdict(bundle: &[u8], crl: &[u8], leaf: &[u8]) -> Result<(), webpki::Error> {
    let crl = webpki::BorrowedCertRevocationList::from_der(crl)?.to_owned()?;
    let crls = [&webpki::CertRevocationList::Owned(crl)];
    let revocation = webpki::RevocationOptionsBuilder::new(&crls)
        .unwrap()
        .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
        .build();
    let ca = rustls_pki_types::CertificateDer::from(bundle);
    let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
    let leaf = rustls_pki_types::CertificateDer::from(leaf);
    let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        Some(revocation),
        None,
    )
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_svid_appears_on_begin_and_is_revoked_on_end() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut stream = open_stream(&daemon).await;
    let first = next_within_a_second(&mut stream).await;
    assert_eq!(first.svids.len(), 1);
    assert!(first.crl.is_empty(), "agents' streams carry no CRL");
    let instance_id = first.svids[0].spiffe_id.clone();
    let mut bundles = open_bundles(&daemon).await;
    let crl_before = until_crl(&mut bundles, Duration::from_secs(1), |_| true).await;

    let mut tasks = tasks_client(&daemon.socket).await;
    let task = tasks
        .begin(begin("job-1", 300))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.spiffe_id, format!("{instance_id}/task/job-1"));

    let with_task = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    assert_eq!(
        with_task.svids[0].hint, "instance",
        "the instance SVID stays first"
    );
    assert_eq!(with_task.svids[1].hint, "task:job-1");
    assert_eq!(with_task.svids[1].spiffe_id, task.spiffe_id);
    let task_leaf = with_task.svids[1].x509_svid.clone();
    let task_serial = serial_of(&task_leaf);
    let bundle = with_task.svids[1].bundle.clone();
    // Before the end, the leaf verifies against the bundle and the current CRL.
    assert_eq!(webpki_verdict(&bundle, &crl_before, &task_leaf), Ok(()));

    let listed = tasks
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);
    assert_eq!(listed.tasks[0].attributes["ticket"], "42");

    tasks
        .end(with_header(EndRequest {
            task_id: "job-1".into(),
        }))
        .await
        .unwrap();
    let after = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 1).await;
    assert_eq!(after.svids[0].hint, "instance");
    assert!(after.crl.is_empty(), "agents' streams carry no CRL");
    let crl = until_crl(&mut bundles, Duration::from_secs(1), |listed| {
        listed.contains(&task_serial)
    })
    .await;
    assert_eq!(
        webpki_verdict(&bundle, &crl, &task_leaf),
        Err(webpki::Error::CertRevoked)
    );
    // A verifier that connects now gets the same CRL at once.
    let fresh = common::first_bundles(&mut raw_client(&daemon.socket).await).await;
    assert!(crl_serials(&fresh.crl[0]).contains(&task_serial));
    openssl_rejects_revoked(&bundle, &crl, &task_leaf);
    daemon.stop().await;
}

/// `openssl crl` parses the CRL and `openssl verify -crl_check` refuses the
/// revoked leaf (when openssl is installed).
fn openssl_rejects_revoked(bundle: &[u8], crl: &[u8], leaf: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let pem = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
    std::fs::write(dir.path().join("ca.pem"), pem("CERTIFICATE", bundle)).unwrap();
    std::fs::write(dir.path().join("crl.pem"), pem("X509 CRL", crl)).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), pem("CERTIFICATE", leaf)).unwrap();
    let Ok(parsed) = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(dir.path().join("crl.pem"))
        .output()
    else {
        eprintln!("openssl not installed: skipped the openssl checks");
        return;
    };
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg("-CRLfile")
        .arg(dir.path().join("crl.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success() && out.contains("revoked"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ends_when_its_ttl_runs_out() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut stream = open_stream(&daemon).await;
    next_within_a_second(&mut stream).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    tasks.begin(begin("job-short", 2)).await.unwrap();
    let with_task = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    // The task SVID's lifetime is bounded by the task's.
    let (_, leaf) = x509_parser::parse_x509_certificate(&with_task.svids[1].x509_svid).unwrap();
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        lifetime <= 2 + 10 + 1,
        "task SVID lifetime {lifetime}s outlives the 2s task"
    );
    until(&mut stream, Duration::from_secs(4), |m| m.svids.len() == 1).await;
    let listed = tasks
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_rule_refuses_with_its_own_message() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    let code_and_message = |r: Result<tonic::Response<_>, tonic::Status>| {
        let s = r.expect_err("refused");
        (s.code(), s.message().to_owned())
    };
    let (code, msg) = code_and_message(tasks.begin(begin("job-1", 3600)).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("tasks.max_ttl"), "{msg}");
    let (code, msg) = code_and_message(tasks.begin(begin("other-1", 60)).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("tasks.id_pattern"), "{msg}");
    let (code, msg) = code_and_message(tasks.begin(begin("job/1", 60)).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("not valid"), "{msg}");
    tasks.begin(begin("job-1", 60)).await.unwrap();
    let (code, _) = code_and_message(tasks.begin(begin("job-1", 60)).await);
    assert_eq!(code, tonic::Code::InvalidArgument, "duplicate id");
    tasks.begin(begin("job-2", 60)).await.unwrap();
    let (code, msg) = code_and_message(tasks.begin(begin("job-3", 60)).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("tasks.max_concurrent"), "{msg}");
    let unknown = tasks
        .end(with_header(EndRequest {
            task_id: "job-9".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let no_header = tasks
        .list(tonic::Request::new(ListRequest {}))
        .await
        .unwrap_err();
    assert_eq!(no_header.code(), tonic::Code::InvalidArgument);
    daemon.stop().await;

    // Without self_declare, agents may not declare tasks at all.
    let daemon = TestDaemon::start().await;
    let mut tasks = tasks_client(&daemon.socket).await;
    let (code, msg) = code_and_message(tasks.begin(begin("job-1", 60)).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("tasks.self_declare"), "{msg}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_path_starts_tasks_for_any_instance() {
    let daemon = TestDaemon::start().await; // self_declare off
    let mut stream = open_stream(&daemon).await;
    next_within_a_second(&mut stream).await;
    let instance = daemon.identity().instances()[0].instance_id.clone();
    let info = daemon
        .identity()
        .begin_task(
            &instance,
            sigil::identity::BeginTask::default(),
            "test operator".into(),
        )
        .await
        .unwrap();
    assert!(
        info.task_id.starts_with("task-"),
        "generated id {}",
        info.task_id
    );
    let msg = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    assert_eq!(msg.svids[1].hint, format!("task:{}", info.task_id));
    daemon
        .identity()
        .end_task(&instance, info.task_id.clone(), "test operator".into())
        .await
        .unwrap();
    until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 1).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_tasks_of_live_processes_and_the_crl() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    tasks.begin(begin("job-kept", 600)).await.unwrap();
    tasks.begin(begin("job-ended", 600)).await.unwrap();
    let mut stream = open_stream(&daemon).await;
    let both = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 3).await;
    let ended_leaf = both
        .svids
        .iter()
        .find(|s| s.hint == "task:job-ended")
        .unwrap()
        .x509_svid
        .clone();
    let ended_serial = serial_of(&ended_leaf);
    let mut bundles = open_bundles(&daemon).await;
    tasks
        .end(with_header(EndRequest {
            task_id: "job-ended".into(),
        }))
        .await
        .unwrap();
    until_crl(&mut bundles, Duration::from_secs(1), |listed| {
        listed.contains(&ended_serial)
    })
    .await;
    let dir = daemon.stop().await;

    let daemon = TestDaemon::start_in(dir, &config("")).await;
    let mut stream = open_stream(&daemon).await;
    let mut bundles = open_bundles(&daemon).await;
    until_crl(&mut bundles, Duration::from_secs(1), |listed| {
        listed.contains(&ended_serial)
    })
    .await;
    let msg = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    let hints: Vec<_> = msg.svids.iter().map(|s| s.hint.as_str()).collect();
    assert_eq!(
        hints,
        ["instance", "task:job-kept"],
        "the live task came back"
    );
    let listed = tasks_client(&daemon.socket)
        .await
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_svid_leaves_the_crl_once_it_has_expired() {
    let daemon = TestDaemon::start_with(&config("[svid]\ntask_ttl = \"2s\"")).await;
    let mut stream = open_stream(&daemon).await;
    next_within_a_second(&mut stream).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    tasks.begin(begin("job-1", 600)).await.unwrap();
    let msg = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    let serial = serial_of(&msg.svids[1].x509_svid);
    let mut bundles = open_bundles(&daemon).await;
    tasks
        .end(with_header(EndRequest {
            task_id: "job-1".into(),
        }))
        .await
        .unwrap();
    until_crl(&mut bundles, Duration::from_secs(1), |listed| {
        listed.contains(&serial)
    })
    .await;
    // The task SVID lived 2s: 10s after that (the clock-skew allowance) the
    // CRL no longer lists it.
    until_crl(&mut bundles, Duration::from_secs(20), |listed| {
        !listed.contains(&serial)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_instance_ends_its_tasks_and_its_stream_and_lists_its_svids() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut stream = open_stream(&daemon).await;
    next_within_a_second(&mut stream).await;
    tasks_client(&daemon.socket)
        .await
        .begin(begin("job-1", 300))
        .await
        .unwrap();
    let msg = until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    let serials: Vec<String> = msg.svids.iter().map(|s| serial_of(&s.x509_svid)).collect();
    let mut bundle = daemon.identity().bundle();
    let instance = daemon.identity().instances()[0].instance_id.clone();
    daemon
        .identity()
        .revoke_instance(&instance, "test operator".into())
        .await
        .unwrap();
    // The SVID stream ends with PermissionDenied (the rust client then
    // withdraws its SVIDs)...
    let end = tokio::time::timeout(Duration::from_secs(1), stream_end(&mut stream))
        .await
        .expect("the stream ended within a second");
    let status = end.expect("an error, not a silent end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("no identity issued"));
    // ...every SVID it held is on the CRL (the revoked process cannot ask
    // for it over the socket any more, so read the daemon's bundle)...
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let listed = bundle
                .borrow_and_update()
                .crls
                .first()
                .map(|c| crl_serials(c))
                .unwrap_or_default();
            if serials.iter().all(|s| listed.contains(s)) {
                return;
            }
            bundle.changed().await.unwrap();
        }
    })
    .await
    .expect("the CRL lists the instance's SVIDs within a second");
    // ...and the process stays revoked: a new request is refused.
    let again = raw_client(&daemon.socket)
        .await
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(again.message().contains("revoked"), "{}", again.message());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_tasks_cleanly_and_loses_nothing() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut stream = open_stream(&daemon).await;
    next_within_a_second(&mut stream).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    tasks.begin(begin("job-1", 300)).await.unwrap();
    until(&mut stream, Duration::from_secs(1), |m| m.svids.len() == 2).await;
    let audited = daemon.store().audit(&Default::default()).unwrap().len();

    // The disk is full: the store cannot grow by a single page.
    let pages = daemon.store().page_count().unwrap();
    daemon.store().limit_pages(pages).unwrap();
    // Pages freed earlier may still take a few rows: begin and end tasks
    // until a begin fails.
    let mut refusal = None;
    for i in 2..500 {
        let id = format!("job-{i}");
        match tasks.begin(begin(&id, 300)).await {
            Err(status) => {
                refusal = Some(status);
                break;
            }
            Ok(_) => {
                let end = EndRequest { task_id: id };
                if let Err(status) = tasks.end(with_header(end)).await {
                    refusal = Some(status);
                    break;
                }
            }
        }
    }
    let status = refusal.expect("a request was refused once the store was full");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("full"), "{}", status.message());
    // Everyone keeps what they had: the live task is still listed and served.
    let listed = tasks
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.iter().any(|t| t.task_id == "job-1"));

    // Room again: work resumes, and nothing written before was lost.
    daemon.store().limit_pages(0).unwrap();
    let end = EndRequest {
        task_id: "job-1".into(),
    };
    tasks.end(with_header(end)).await.unwrap();
    tasks.begin(begin("job-after", 300)).await.unwrap();
    let now_audited = daemon.store().audit(&Default::default()).unwrap().len();
    assert!(now_audited > audited);
    daemon.stop().await;
}

/// The fan-out: another process's task end reaches a verifier's bundle
/// stream within the push budget, and wakes no other agent's SVID stream
/// (agents' streams carry no CRL, so they have nothing to be told).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agents_task_end_reaches_verifiers_and_wakes_no_other_agent() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut mine = open_stream(&daemon).await;
    next_within_a_second(&mut mine).await;
    let mut bundles = open_bundles(&daemon).await;
    until_crl(&mut bundles, Duration::from_secs(1), |_| true).await;

    let mut other = common::agent::Agent::start(&daemon).await;
    other.fetch().await;
    assert_eq!(other.task_command("begin job-9 60").await, "Ok");
    let with_task = other
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["svids"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
    let serial = with_task["svids"][1]["serial"].as_str().unwrap().to_owned();
    assert_eq!(other.task_command("end job-9").await, "Ok");
    // Within the push budget: `until_crl` fails the test past 1 s.
    until_crl(&mut bundles, Duration::from_secs(1), |listed| {
        listed.contains(&serial)
    })
    .await;
    // Nothing of this instance changed: its stream stays quiet.
    let woke = tokio::time::timeout(Duration::from_millis(500), mine.next()).await;
    assert!(
        woke.is_err(),
        "another agent's task end pushed to this agent's stream: {woke:?}"
    );
    daemon.stop().await;
}
