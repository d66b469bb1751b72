//! kill -9 of the daemon in the middle of a load of task begins and ends,
//! then a restart on the same state directory: the store opens, and the
//! audit trail agrees with the records (each SVID and task row was written
//! in one transaction with its audit row, so neither exists without the other).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{tasks_client, with_header};
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest, ListRequest};
use sigil::store::{AuditKind, AuditQuery, Store};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

fn start(dir: &Path) -> Child {
    let config = dir.join("sigil.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"crash.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n[entry.tasks]\nself_declare = true\nmax_concurrent = 1024\nbegin_burst = 1000\nbegin_per_second = 1000\n",
            nix::unistd::geteuid()
        ),
    )
    .unwrap();
    let socket = dir.join("w.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(SIGIL)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Runs `sigil fetch x509 --json` against `socket` as a new process and
/// returns the serial of the SVID it was handed, if it got one.
fn fetch_serial(socket: &Path) -> Option<String> {
    let out = Command::new(SIGIL)
        .args(["fetch", "x509", "--json", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    json[0]["serial"].as_str().map(str::to_owned)
}

/// Eight clients at once, each a new process that gets its first SVID, so
/// the daemon's writer commits their rows in groups; kill -9 mid-load.
/// Every SVID a client was handed is in the store after the restart: no
/// row was acknowledged (and its SVID handed out) before its group's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_group_commits_loses_no_svid_that_was_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start(dir.path());
    let socket = dir.path().join("w.sock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut handed_out = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match fetch_serial(&socket) {
                        Some(serial) => handed_out.push(serial),
                        None => break, // the daemon is gone
                    }
                }
                handed_out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.kill().unwrap(); // SIGKILL, mid-load
    daemon.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let handed_out: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    eprintln!("SVIDs handed out before the kill: {}", handed_out.len());
    assert!(handed_out.len() >= 8, "the load ran: {}", handed_out.len());

    let store = Store::open(&dir.path().join("state")).unwrap();
    for serial in &handed_out {
        assert!(
            store.svid(serial).unwrap().is_some(),
            "SVID {serial} was handed out but is not in the store"
        );
    }
    // And a restart serves again on the same store.
    drop(store);
    let mut daemon = start(dir.path());
    assert!(
        fetch_serial(&socket).is_some(),
        "the restarted daemon serves"
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

fn begin(id: String) -> tonic::Request<BeginRequest> {
    with_header(BeginRequest {
        task_id: id,
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        attributes: Default::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_leaves_a_readable_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start(dir.path());
    let socket = dir.path().join("w.sock");

    // Load: begin tasks (ending every other one) until the daemon dies.
    let load_socket = socket.clone();
    let load = tokio::spawn(async move {
        let mut tasks = tasks_client(&load_socket).await;
        let mut begun = 0u32;
        for i in 0.. {
            if tasks.begin(begin(format!("job-{i}"))).await.is_err() {
                break;
            }
            begun += 1;
            if i % 2 == 1
                && tasks
                    .end(with_header(EndRequest {
                        task_id: format!("job-{i}"),
                    }))
                    .await
                    .is_err()
            {
                break;
            }
        }
        begun
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let begun = load.await.unwrap();
    eprintln!("tasks begun before the kill: {begun}");
    assert!(begun > 10, "the load ran ({begun} tasks begun)");

    // Restart on the same state directory: it opens its store and serves.
    let mut daemon = start(dir.path());
    let listed = tasks_client(&socket)
        .await
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !listed.tasks.is_empty(),
        "live tasks of this live process came back"
    );
    assert!(
        listed.tasks.iter().all(|t| {
            let n: u32 = t.task_id.trim_start_matches("job-").parse().unwrap();
            n.is_multiple_of(2) || n + 1 >= begun
        }),
        "only tasks that were not ended came back"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&daemon),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());

    // The store agrees with its audit trail.
    let store = Store::open(&dir.path().join("state")).unwrap();
    let events = store.audit(&AuditQuery::default()).unwrap();
    let mut issued = 0;
    for event in &events {
        match event.kind {
            AuditKind::Issuance | AuditKind::Rotation => {
                let serial = event.serial.as_deref().unwrap();
                assert!(
                    store.svid(serial).unwrap().is_some(),
                    "audited SVID {serial} has its record"
                );
                issued += 1;
            }
            AuditKind::TaskBegin => {
                let instance = event.instance_id.as_deref().unwrap();
                let task = event.task_id.as_deref().unwrap();
                let tasks = store.tasks_of(instance).unwrap();
                assert!(
                    tasks.iter().any(|t| t.task_id == task),
                    "audited task {task} has its record"
                );
            }
            _ => {}
        }
    }
    assert!(issued > 10);
    for instance in store.live_instances().unwrap() {
        for svid in store.svids_of(&instance.instance_id).unwrap() {
            let audited = events
                .iter()
                .any(|e| e.serial.as_deref() == Some(svid.serial.as_str()));
            assert!(audited, "SVID {} has its audit row", svid.serial);
        }
    }
}
