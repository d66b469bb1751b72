//! `sigil helper`, the real binary against a daemon with a short SVID
//! lifetime: its files appear (key 0600, LF PEM, every SVID numbered), are
//! rewritten on rotation with the command re-run and the signal delivered,
//! `crl.pem` follows another agent's task end and another process's exit,
//! and `openssl verify -crl_check` on its files passes for its own SVID and
//! fails for a revoked one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::agent::Agent;
use common::{TestDaemon, config_for_me, crl_serials, eventually, serial_of};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pem_der(path: &Path, tag: &str) -> Option<Vec<u8>> {
    let text = std::fs::read(path).ok()?;
    pem::parse_many(text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == tag)
        .map(pem::Pem::into_contents)
}

fn serial_in(path: &Path) -> Option<String> {
    pem_der(path, "CERTIFICATE").map(|der| serial_of(&der))
}

fn crl_lists(dir: &Path, serial: &str) -> bool {
    pem_der(&dir.join("crl.pem"), "X509 CRL")
        .is_some_and(|crl| crl_serials(&crl).iter().any(|s| s == serial))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// `openssl verify -crl_check` of `cert` against the helper's files.
fn openssl_verify(dir: &Path, cert: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-CRLfile")
        .arg(dir.join("crl.pem"))
        .arg(cert)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_files_follow_rotation_tasks_and_revocations_and_notify_each_time() {
    let config = format!(
        "{}[entry.tasks]\nself_declare = true\n",
        config_for_me("[svid]\ninstance_ttl = \"4s\"\n")
    );
    let daemon = TestDaemon::start_with(&config).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("files");
    let runs = work.path().join("runs.log");
    let signals = work.path().join("signals.log");
    // A process that records each SIGUSR1 it gets.
    let trapper = Killed(
        Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "trap 'echo got >> {}' USR1; while :; do sleep 0.05; done",
                signals.display()
            ))
            .spawn()
            .unwrap(),
    );
    let mut helper = Killed(
        Command::new(SIGIL)
            .args(["helper", "--socket"])
            .arg(&daemon.socket)
            .arg("--dir")
            .arg(&dir)
            .arg("--exec")
            .arg(format!("echo ran >> {}", runs.display()))
            .args(["--signal", "USR1", "--pid", &trapper.0.id().to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(10), || dir.join("svid.pem").exists()).await,
        "the helper wrote its files"
    );
    for name in [
        "svid_key.pem",
        "bundle.pem",
        "crl.pem",
        "svid.0.pem",
        "svid.0.key",
    ] {
        assert!(dir.join(name).exists(), "{name}");
    }
    for key in ["svid_key.pem", "svid.0.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let text = std::fs::read(dir.join("svid.pem")).unwrap();
    assert!(!text.contains(&b'\r'), "LF line endings");
    let (ok, out) = openssl_verify(&dir, &dir.join("svid.pem"));
    assert!(ok, "the helper's own SVID verifies with its CRL: {out}");

    // Rotation (at 45 to 80% of 4 s): new files, the command and signal again.
    let first = serial_in(&dir.join("svid.pem")).unwrap();
    assert!(
        eventually(Duration::from_secs(6), || serial_in(&dir.join("svid.pem"))
            .is_some_and(|s| s != first))
        .await,
        "svid.pem rewritten on rotation"
    );
    assert!(
        eventually(Duration::from_secs(2), || lines(&runs) >= 2
            && lines(&signals) >= 2)
        .await,
        "command re-run ({}) and signal delivered ({}) after each write",
        lines(&runs),
        lines(&signals)
    );

    // Another agent's task ends: its serial reaches the helper's crl.pem.
    let mut agent = Agent::start(&daemon).await;
    agent.fetch().await;
    assert_eq!(agent.task_command("begin job 60").await, "Ok");
    let with_task = agent
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["svids"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
    let task_serial = with_task["svids"][1]["serial"].as_str().unwrap().to_owned();
    assert_eq!(agent.task_command("end job").await, "Ok");
    assert!(
        eventually(Duration::from_secs(3), || crl_lists(&dir, &task_serial)).await,
        "crl.pem lists the ended task's SVID"
    );

    // A one-shot fetch exits: its SVID is revoked, and openssl says so.
    let fetched = work.path().join("fetched");
    let out = Command::new(SIGIL)
        .args(["fetch", "x509", "--socket"])
        .arg(&daemon.socket)
        .arg("--write")
        .arg(&fetched)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked within a second of its exit"),
        "fetch --write says its files die with it"
    );
    assert!(fetched.join("crl.pem").exists() && fetched.join("svid.0.pem").exists());
    let serial = serial_in(&fetched.join("svid.pem")).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || crl_lists(&dir, &serial)).await,
        "crl.pem lists the exited process's SVID"
    );
    let (ok, out) = openssl_verify(&dir, &fetched.join("svid.pem"));
    assert!(
        !ok && out.contains("revoked"),
        "openssl refuses the revoked SVID: {out}"
    );

    // SIGTERM: the helper stops cleanly.
    let pid = rustix::process::Pid::from_raw(helper.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let stopped = eventually(Duration::from_secs(5), || {
        helper.0.try_wait().unwrap().is_some_and(|s| s.success())
    })
    .await;
    assert!(stopped, "the helper exits 0 on SIGTERM");
    drop(trapper);
    daemon.stop().await;
}
