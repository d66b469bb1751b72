//! Start-up and store faults, with the `sigil` binary and real files: an
//! emptied store or a damaged WAL stops the daemon and is left exactly as it
//! was; a second daemon on a live socket stops cleanly before touching the
//! first one's state; nothing but a socket is ever bound over or removed; a
//! directory another user controls is refused; SIGHUP does not kill the
//! daemon; the fd limit is raised; and a revocation that meets a full disk
//! is retried until it is recorded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A directory with a config admitting this uid; the socket and the state
/// directory are passed on the command line.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    state: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sigil.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"startup.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n",
                uid()
            ),
        )
        .unwrap();
        let socket = dir.path().join("run/workload.sock");
        let state = dir.path().join("state");
        Self {
            dir,
            config,
            socket,
            state,
        }
    }

    fn command(&self) -> Command {
        self.command_with(&self.socket, &self.state)
    }

    fn command_with(&self, socket: &Path, state: &Path) -> Command {
        let mut cmd = Command::new(SIGIL);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
            .env_remove("SIGIL_CONFIG")
            .stdin(Stdio::null());
        cmd
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// A daemon process started from the binary; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Starts `cmd` and waits for its socket to appear.
    fn start(cmd: &mut Command, socket: &Path) -> Daemon {
        Self::start_logging(cmd, socket, Stdio::null())
    }

    /// As [`Daemon::start`], with the daemon's stderr (its log) to `log`.
    fn start_logging(cmd: &mut Command, socket: &Path, log: impl Into<Stdio>) -> Daemon {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sigil run starts");
        let mut daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = daemon.0.try_wait().unwrap() {
                panic!("the daemon exited at start-up: {status:?}");
            }
            assert!(
                Instant::now() < deadline,
                "socket {} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.0), signal).unwrap();
    }

    /// Sends SIGTERM and returns the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a daemon that is expected to refuse to start; fails the test if it
/// is still running after 30 s.
fn run_to_refusal(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sigil run starts");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = done_tx.send(());
        out
    });
    if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
            rustix::process::Signal::KILL,
        );
        panic!("the daemon was expected to refuse to start, but kept running");
    }
    let out = waiter.join().unwrap().unwrap();
    assert!(
        !out.status.success(),
        "the daemon started: {}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "it panicked: {stderr}");
    out
}

/// Everything about a directory tree that a refused start must not change:
/// per entry its kind, mode, owner, size, mtime, and bytes or link target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let kind = meta.file_type();
        let content = if kind.is_symlink() {
            format!("-> {}", std::fs::read_link(&path).unwrap().display())
        } else if kind.is_file() {
            hex::encode(std::fs::read(&path).unwrap())
        } else {
            String::new()
        };
        if kind.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                todo.push(entry.unwrap().path());
            }
        }
        let mtime = (meta.mtime(), meta.mtime_nsec());
        out.insert(
            path.strip_prefix(root).unwrap().to_owned(),
            format!(
                "{kind:?} mode {:o} uid {} len {} mtime {mtime:?} {content}",
                meta.mode(),
                meta.uid(),
                meta.len()
            ),
        );
    }
    out
}

/// Starts a daemon once on `setup` (CA and store created) and stops it.
fn used_state_dir(setup: &Setup) {
    let daemon = Daemon::start(&mut setup.command(), &setup.socket);
    let fetch = Command::new(SIGIL)
        .args(["fetch", "x509", "--socket", &setup.endpoint()])
        .output()
        .unwrap();
    assert!(fetch.status.success(), "{}", text(&fetch.stderr));
    assert!(daemon.terminate().success());
    assert!(setup.state.join("ca/ca_cert.pem").exists());
}

#[test]
fn an_empty_store_beside_an_existing_ca_stops_the_daemon_and_is_left_untouched() {
    let setup = Setup::new();
    used_state_dir(&setup);
    let db = setup.state.join("sigil.db");
    std::fs::write(&db, b"").unwrap();
    for side in ["sigil.db-wal", "sigil.db-shm"] {
        let _ = std::fs::remove_file(setup.state.join(side));
    }
    let before = snapshot(&setup.state);

    let out = run_to_refusal(&mut setup.command());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("is empty") && stderr.contains("ca_cert.pem"),
        "{stderr}"
    );
    assert_eq!(
        snapshot(&setup.state),
        before,
        "the state directory changed"
    );
    assert!(!setup.socket.exists(), "the refused daemon left its socket");
}

#[test]
fn a_garbage_wal_stops_the_daemon_and_the_store_is_left_untouched() {
    let setup = Setup::new();
    used_state_dir(&setup);
    let wal = setup.state.join("sigil.db-wal");
    std::fs::write(&wal, b"this is no write-ahead log ".repeat(200)).unwrap();
    let before = snapshot(&setup.state);

    let out = run_to_refusal(&mut setup.command());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&wal.display().to_string()), "{stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");
    assert_eq!(
        snapshot(&setup.state),
        before,
        "the state directory changed"
    );
}

#[test]
fn a_brand_new_state_directory_is_still_a_fresh_start() {
    let setup = Setup::new();
    let daemon = Daemon::start(&mut setup.command(), &setup.socket);
    assert!(daemon.terminate().success());
    assert!(setup.state.join("sigil.db").metadata().unwrap().len() > 0);
    assert!(setup.state.join("ca/ca_cert.pem").exists());
}

#[test]
fn a_second_daemon_on_a_live_socket_stops_cleanly_and_never_touches_the_first_ones_state() {
    let setup = Setup::new();
    let first = Daemon::start(&mut setup.command(), &setup.socket);
    // Let the first daemon finish its start-up writes (the first CRL).
    std::thread::sleep(Duration::from_millis(500));
    let before = snapshot(&setup.state);
    for attempt in 0..10 {
        let out = run_to_refusal(&mut setup.command());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("already serving on") && stderr.contains("workload.sock"),
            "attempt {attempt}: {stderr}"
        );
    }
    assert_eq!(
        snapshot(&setup.state),
        before,
        "the first daemon's state changed"
    );
    let health = Command::new(SIGIL)
        .args(["healthcheck", "--socket", &setup.endpoint()])
        .output()
        .unwrap();
    assert!(health.status.success(), "the first daemon still serves");
    assert!(first.terminate().success());
}

#[test]
fn a_dangling_symlink_at_the_socket_path_is_named_and_left_in_place() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.socket.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/nonexistent/attacker.sock", &setup.socket).unwrap();
    let out = run_to_refusal(&mut setup.command());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is a symlink to /nonexistent/attacker.sock (dangling), not a socket"),
        "{stderr}"
    );
    assert!(stderr.contains("remove it"), "{stderr}");
    let meta = std::fs::symlink_metadata(&setup.socket).unwrap();
    assert!(meta.file_type().is_symlink(), "the symlink was removed");
    assert!(!setup.state.exists(), "the state directory was touched");
}

#[test]
fn a_regular_file_or_a_directory_at_the_socket_path_is_refused_and_kept() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.socket.parent().unwrap()).unwrap();
    std::fs::write(&setup.socket, b"someone's file").unwrap();
    let out = run_to_refusal(&mut setup.command());
    assert!(text(&out.stderr).contains("is a regular file, not a socket"));
    assert_eq!(std::fs::read(&setup.socket).unwrap(), b"someone's file");

    std::fs::remove_file(&setup.socket).unwrap();
    std::fs::create_dir(&setup.socket).unwrap();
    let out = run_to_refusal(&mut setup.command());
    assert!(text(&out.stderr).contains("is a directory, not a socket"));
    assert!(setup.socket.is_dir());
}

/// Tests that need a directory owned by another uid run only as root.
fn skip_unless_root(test: &str) -> bool {
    if uid() == 0 {
        return false;
    }
    eprintln!("{test}: skipped, it needs root to give a directory to uid 65534 (nobody)");
    true
}

const NOBODY: u32 = 65534;

#[test]
fn a_state_directory_below_a_directory_owned_by_nobody_is_refused() {
    if skip_unless_root("a_state_directory_below_a_directory_owned_by_nobody_is_refused") {
        return;
    }
    let setup = Setup::new();
    let theirs = setup.dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The state directory itself is root's and private: only its parent is not.
    let state = theirs.join("sigil/state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let before = snapshot(&theirs);

    let out = run_to_refusal(&mut setup.command_with(&setup.socket, &state));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&theirs.display().to_string()), "{stderr}");
    assert!(stderr.contains("uid 65534"), "{stderr}");
    assert_eq!(snapshot(&theirs), before, "nothing was created there");
}

#[test]
fn a_socket_directory_below_a_directory_owned_by_nobody_is_refused() {
    if skip_unless_root("a_socket_directory_below_a_directory_owned_by_nobody_is_refused") {
        return;
    }
    let setup = Setup::new();
    let theirs = setup.dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = theirs.join("sigil/workload.sock");

    let out = run_to_refusal(&mut setup.command_with(&socket, &setup.state));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&theirs.display().to_string()), "{stderr}");
    assert!(stderr.contains("uid 65534"), "{stderr}");
    assert!(
        !theirs.join("sigil").exists(),
        "the daemon created a directory there"
    );
}

#[test]
fn a_state_directory_that_is_a_symlink_owned_by_nobody_is_refused() {
    if skip_unless_root("a_state_directory_that_is_a_symlink_owned_by_nobody_is_refused") {
        return;
    }
    let setup = Setup::new();
    let real = setup.dir.path().join("real-state");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = setup.dir.path().join("state-link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();

    let out = run_to_refusal(&mut setup.command_with(&setup.socket, &link));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&link.display().to_string()) && stderr.contains("symlink"),
        "{stderr}"
    );
    assert!(stderr.contains("uid 65534"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "nothing written"
    );
}

fn healthcheck(setup: &Setup) -> Output {
    Command::new(SIGIL)
        .args(["healthcheck", "--socket", &setup.endpoint()])
        .output()
        .unwrap()
}

#[test]
fn sighup_is_logged_and_ignored_then_sigterm_still_stops_cleanly() {
    let setup = Setup::new();
    let log_path = setup.dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Daemon::start_logging(&mut setup.command(), &setup.socket, log);
    for _ in 0..3 {
        daemon.signal(rustix::process::Signal::HUP);
    }
    std::thread::sleep(Duration::from_millis(300));
    let died = daemon.0.try_wait().unwrap();
    assert!(died.is_none(), "the daemon died of SIGHUP: {died:?}");
    let health = healthcheck(&setup);
    assert!(
        health.status.success(),
        "no longer serving after SIGHUP: {}",
        text(&health.stdout)
    );
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("SIGHUP received"), "{logged}");

    let status = daemon.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(!setup.socket.exists(), "socket removed on exit");
}

/// The soft and hard "Max open files" of a process, from /proc.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_none_or(|h| h <= 256) {
        eprintln!(
            "the_soft_open_file_limit_is_raised_to_the_hard_limit: skipped, the hard limit ({hard:?}) leaves nothing to raise"
        );
        return;
    }
    let setup = Setup::new();
    // A shell lowers the soft limit, then becomes the daemon.
    let run = setup.command();
    let mut line = String::from("ulimit -Sn 256 && exec");
    line.push(' ');
    line.push_str(SIGIL);
    for arg in run.get_args() {
        line.push_str(&format!(" '{}'", arg.to_string_lossy()));
    }
    let mut shell = Command::new("sh");
    shell.args(["-c", &line]);
    let daemon = Daemon::start(&mut shell, &setup.socket);
    let (soft, hard) = open_file_limits(daemon.0.id());
    assert_eq!(soft, hard, "the soft limit was not raised");
    assert_ne!(soft, "256");
    assert!(daemon.terminate().success());
}

/// Starts an ordinary agent (python, as this uid, speaking HTTP/2 on its
/// own connection) that fetches its SVID and then waits for a line on
/// stdin before it exits. Returns it and the serial of the SVID it got.
fn start_agent(daemon: &common::TestDaemon) -> (Child, String) {
    use std::io::BufRead;
    let script = daemon.dir.path().join("h2attack.py");
    std::fs::write(&script, common::ATTACK_SCRIPT).unwrap();
    let mut child = Command::new(common::ATTACK_PYTHON)
        .arg("-I")
        .arg(&script)
        .arg("fetch-hold")
        .arg(&daemon.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["got_svid"], true, "the agent got its SVID: {report}");
    let pid = child.id();
    let instance = daemon
        .identity()
        .instances()
        .into_iter()
        .find(|i| i.pid == pid)
        .expect("the agent's instance is live");
    let issued = daemon
        .store()
        .audit(&sigil::store::AuditQuery {
            instance_id: Some(instance.instance_id.to_string()),
            kind: Some(sigil::store::AuditKind::Issuance),
            ..Default::default()
        })
        .unwrap();
    let serial = issued[0]
        .serial
        .clone()
        .expect("an issuance names its serial");
    (child, serial)
}

/// Fills the store up to a page quota of its current size, as a full disk
/// would: audit rows go in until one no longer fits, large then small.
fn fill_store(store: &sigil::store::Store) {
    let pages = store.page_count().unwrap();
    store.limit_pages(pages).unwrap();
    for size in [64 * 1024, 4096, 256, 1] {
        for _ in 0..10_000 {
            let event = sigil::store::AuditEvent {
                seq: 0,
                at: std::time::SystemTime::now(),
                kind: sigil::store::AuditKind::Admin,
                actor: "test filling the disk".to_owned(),
                instance_id: None,
                task_id: None,
                spiffe_id: None,
                serial: None,
                detail: serde_json::json!({ "padding": "x".repeat(size) }),
                hash: None,
            };
            if store.write(move |tx| tx.append_audit(&event)).is_err() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_that_meets_a_full_disk_is_revoked_once_there_is_room_again() {
    use common::{crl_serials, eventually, raw_client};
    use sigil::proto::workload::X509BundlesRequest;
    use tokio_stream::StreamExt;

    let daemon = common::TestDaemon::start().await;
    // A verifier's view: the test's own bundle stream, carrying the CRL.
    let mut verifier = raw_client(&daemon.socket).await;
    let mut bundles = verifier
        .fetch_x509_bundles(common::with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    bundles.next().await.unwrap().unwrap();

    let (mut agent, serial) = start_agent(&daemon);
    let pid = agent.id();

    fill_store(daemon.store());
    use std::io::Write;
    agent.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    agent.wait().unwrap();
    // The disk is full: the exit cannot be recorded yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let record = daemon.store().svid(&serial).unwrap().unwrap();
    assert!(
        record.revoked_at.is_none(),
        "the store was not full enough to refuse the revocation"
    );

    daemon.store().limit_pages(0).unwrap();
    let revoked = eventually(Duration::from_secs(10), || {
        daemon
            .store()
            .svid(&serial)
            .unwrap()
            .is_some_and(|r| r.revoked_at.is_some())
    })
    .await;
    assert!(revoked, "the exited instance's SVID was never revoked");
    let listed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(message) = bundles.next().await {
            let crl = message.unwrap().crl;
            if crl.iter().any(|c| crl_serials(c).contains(&serial)) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(listed, Ok(true), "the CRL never listed the revoked SVID");
    assert!(daemon.identity().instances().iter().all(|i| i.pid != pid));
    daemon.stop().await;
}

#[test]
fn a_failure_after_the_socket_is_bound_removes_it_and_never_panics() {
    let setup = Setup::new();
    used_state_dir(&setup);
    let other = setup.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "trust_domain = \"other.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n",
            uid()
        ),
    )
    .unwrap();
    for attempt in 0..5 {
        let out = run_to_refusal(
            Command::new(SIGIL)
                .args(["run", "--config"])
                .arg(&other)
                .arg("--socket")
                .arg(&setup.socket)
                .arg("--state-dir")
                .arg(&setup.state),
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("belongs to trust domain"),
            "attempt {attempt}: {stderr}"
        );
        assert!(
            !setup.socket.exists(),
            "attempt {attempt}: the socket was left behind"
        );
    }
}
