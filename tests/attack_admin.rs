//! Attacks on the admin socket from another uid: the real `sigil` binary
//! run as `nobody` (uid and gid 65534, through `setpriv`) against a daemon
//! in process whose temp directory every user may traverse
//! (`start_reachable`).
//!
//! Two walls keep others out: the socket's mode (0600, or 0660 with
//! `[admin_api] group`; `allowed_uids` by a POSIX ACL entry each), and,
//! when the mode is wrong, the daemon's own peer-credential check on every
//! call, refused calls audited. A flood of junk connections must not keep
//! root's `sigil status` from answering.
//!
//! The attacks need a second uid: as root (CI) they run as `nobody`;
//! otherwise each test prints why it is skipped and passes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::io::BufRead;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::{NOBODY, TestDaemon, admin_client, cannot_run_as_nobody, config_for_me};
use serde_json::Value;
use sigil::proto::sigil::admin::v1 as pb;
use sigil::store::{AuditKind, AuditQuery};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");
const SETPRIV: &str = "/usr/bin/setpriv";

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// Starts a daemon nobody can reach with `config`, or `None` (the reason
/// printed) where nobody is out of reach.
async fn daemon_for_nobody(config: &str) -> Option<TestDaemon> {
    if let Some(why) = cannot_run_as_nobody() {
        eprintln!("skipped: {why}");
        return None;
    }
    if !std::path::Path::new(SETPRIV).exists() {
        eprintln!("skipped: {SETPRIV} is missing");
        return None;
    }
    Some(common::start_reachable(config).await)
}

/// What one `sigil` run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `sigil args... --admin-socket <daemon's>` to its end, as
/// [`NOBODY`] when `as_nobody`, else as this process's user (root).
async fn sigil(daemon: &TestDaemon, as_nobody: bool, args: &[&str]) -> Run {
    let mut cmd = if as_nobody {
        let mut c = Command::new(SETPRIV);
        c.args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            SIGIL.into(),
        ]);
        c
    } else {
        Command::new(SIGIL)
    };
    cmd.args(args)
        .arg("--admin-socket")
        .arg(&daemon.admin_socket)
        .current_dir(daemon.dir.path())
        .env_remove("SIGIL_ADMIN_SOCKET")
        .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("sigil runs"))
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The socket's mode bits (permissions only), owner and group.
fn socket_facts(daemon: &TestDaemon) -> (u32, u32, u32) {
    let meta = std::fs::symlink_metadata(&daemon.admin_socket).expect("the admin socket exists");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid())
}

fn chmod_666(daemon: &TestDaemon) {
    std::fs::set_permissions(&daemon.admin_socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod the admin socket");
}

/// The admin calls the audit trail records for callers of `uid`.
fn admin_rows_of(daemon: &TestDaemon, uid: u32) -> Vec<sigil::store::AuditEvent> {
    let query = AuditQuery {
        kind: Some(AuditKind::Admin),
        ..Default::default()
    };
    let prefix = format!("admin uid:{uid} ");
    daemon
        .store()
        .audit(&query)
        .expect("the audit trail reads")
        .into_iter()
        .filter(|e| e.actor.starts_with(&prefix))
        .collect()
}

/// Root's `sigil status --json` answers, with the daemon's facts.
async fn root_status(daemon: &TestDaemon) -> Value {
    let run = sigil(daemon, false, &["status", "--json"]).await;
    assert_eq!(run.code, Some(0), "root's status: {run:?}");
    serde_json::from_str(&run.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_socket_is_0600_for_root_and_nobody_is_refused_at_connect() {
    let Some(daemon) = daemon_for_nobody(&config_for_me("")).await else {
        return;
    };
    let (mode, uid, _) = socket_facts(&daemon);
    assert_eq!(mode, 0o600, "mode {mode:o}");
    assert_eq!(
        uid,
        nix::unistd::geteuid().as_raw(),
        "owned by the daemon's user"
    );

    let run = sigil(&daemon, true, &["status"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    let path = daemon.admin_socket.display().to_string();
    assert_eq!(
        run.stderr,
        format!(
            "sigil: {path} is not accessible to uid {NOBODY}: the admin socket is for root, the \
             daemon's user, [admin_api] allowed_uids and members of [admin_api] group\n"
        ),
        "the CLI's permission message, once"
    );
    // The kernel refused the connect: the daemon never heard of nobody.
    assert!(admin_rows_of(&daemon, NOBODY).is_empty());

    let status = root_status(&daemon).await;
    assert_eq!(status["trust_domain"], common::TRUST_DOMAIN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_socket_still_refuses_nobody_by_peer_credentials_audits_it_and_revokes_nothing()
 {
    let Some(daemon) = daemon_for_nobody(&config_for_me("")).await else {
        return;
    };
    let mut agent = Agent::start(&daemon).await;
    agent.fetch().await;
    // A misconfiguration, by hand.
    chmod_666(&daemon);

    for args in [&["status"][..], &["revoke", "entry", "tester"]] {
        let run = sigil(&daemon, true, args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
        assert!(
            run.stderr
                .starts_with(&format!("sigil: uid {NOBODY} may not use the admin API: ")),
            "the daemon's PermissionDenied: {args:?}: {run:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    }

    // Nothing was revoked: the agent's stream is up, its instance live.
    let events = agent.drain(Duration::from_millis(500)).await;
    assert!(
        events.iter().all(|e| e["event"] != "stream_end"),
        "the agent's stream stays up: {events:?}"
    );
    let instances = admin_client(&daemon)
        .await
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(instances.len(), 1);
    assert!(instances[0].ended_at.is_none(), "{instances:?}");
    assert!(instances[0].svids[0].revoked_at.is_none(), "{instances:?}");

    // Each refused call has its audit row.
    let rows = admin_rows_of(&daemon, NOBODY);
    let calls: Vec<&str> = rows
        .iter()
        .map(|e| e.detail["call"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["Status", "RevokeEntry"], "{rows:?}");
    for row in &rows {
        assert!(
            row.actor.starts_with(&format!("admin uid:{NOBODY} pid:")),
            "{row:?}"
        );
        assert_eq!(row.detail["admitted"], false, "{row:?}");
        assert!(
            row.detail["refused"]
                .as_str()
                .unwrap()
                .contains("may not use the admin API"),
            "{row:?}"
        );
    }
    // And the refused rows are there for operators too.
    let run = sigil(&daemon, false, &["audit", "--kind", "admin", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let refused = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["detail"]["admitted"] == false)
        .count();
    assert_eq!(refused, 2);
    root_status(&daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_uid_gets_an_acl_entry_and_is_admitted_while_others_get_nothing() {
    let config = config_for_me(&format!("[admin_api]\nallowed_uids = [{NOBODY}]"));
    let Some(daemon) = daemon_for_nobody(&config).await else {
        return;
    };
    let mut agent = Agent::start(&daemon).await;
    agent.fetch().await;
    let (mode, uid, _) = socket_facts(&daemon);
    assert_eq!(mode & 0o700, 0o600, "mode {mode:o}");
    assert_eq!(mode & 0o007, 0, "others get nothing: mode {mode:o}");
    assert_eq!(uid, nix::unistd::geteuid().as_raw());
    let mut acl = vec![0u8; 256];
    let len = rustix::fs::getxattr(&daemon.admin_socket, "system.posix_acl_access", &mut acl)
        .expect("the socket has an access ACL");
    // version 2, then (tag, perm, id) entries: a USER entry (2) for nobody, rw.
    let entries: Vec<(u16, u16, u32)> = acl[4..len]
        .chunks(8)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u16::from_le_bytes([c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    assert!(entries.contains(&(2, 0o6, NOBODY)), "{entries:?}");

    let run = sigil(&daemon, true, &["instances", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let listed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["pid"], agent.pid());
    let rows = admin_rows_of(&daemon, NOBODY);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].detail["admitted"], true);
    assert_eq!(rows[0].detail["call"], "ListInstances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_group_gets_a_0660_socket_and_its_members_are_admitted() {
    let group = match nix::unistd::Group::from_name("nogroup") {
        Ok(Some(group)) if group.gid.as_raw() == NOBODY => group,
        other => {
            eprintln!("skipped: no group nogroup with gid {NOBODY} here ({other:?})");
            return;
        }
    };
    let Some(daemon) = daemon_for_nobody(&config_for_me("[admin_api]\ngroup = \"nogroup\"")).await
    else {
        return;
    };
    let (mode, uid, gid) = socket_facts(&daemon);
    assert_eq!(mode, 0o660, "mode {mode:o}");
    assert_eq!(uid, nix::unistd::geteuid().as_raw());
    assert_eq!(gid, group.gid.as_raw(), "owned by the admin group");

    let run = sigil(&daemon, true, &["status", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let status: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(status["trust_domain"], common::TRUST_DOMAIN);
    let rows = admin_rows_of(&daemon, NOBODY);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].detail["admitted"], true);
}

/// Opens `n` connections to the socket `argv[1]`, writes junk on every
/// other one and nothing on the rest, prints how many are open as one
/// JSON line and holds them `argv[3]` seconds.
const FLOOD: &str = r#"
import json, socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, errors = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if i % 2 == 0:
            s.sendall(b"\x00\xffGET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)
        held.append(s)
    except OSError as e:
        errors.append(str(e))
print(json.dumps({"open": len(held), "errors": errors[:3]}), flush=True)
time.sleep(hold)
"#;

/// A process group killed (every process in it) when dropped.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pgid) = pgid {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_junk_connections_from_nobody_do_not_keep_root_s_status_from_answering() {
    const CONNECTIONS: usize = 200;
    let Some(daemon) = daemon_for_nobody(&config_for_me("")).await else {
        return;
    };
    chmod_666(&daemon);
    let mut child = Command::new(SETPRIV)
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            common::ATTACK_PYTHON.into(),
            "-I".into(),
            "-c".into(),
            FLOOD.into(),
        ])
        .arg(&daemon.admin_socket)
        .arg(CONNECTIONS.to_string())
        .arg("30")
        .current_dir(daemon.dir.path())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("the flood starts");
    let stdout = child.stdout.take().unwrap();
    let flood = Group(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("the flood opened its connections within 20 s")
        .unwrap();
    let report: Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(report["open"], CONNECTIONS, "{report}");

    for _ in 0..3 {
        let started = Instant::now();
        let status = root_status(&daemon).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "root's status answered in {took:?} under the flood"
        );
        assert_eq!(status["trust_domain"], common::TRUST_DOMAIN);
    }
    drop(flood);
    // The junk never reached a call: nothing of nobody's was audited.
    assert!(admin_rows_of(&daemon, NOBODY).is_empty());
}
