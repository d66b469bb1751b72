//! The `sigil` binary as a user runs it: `run` with good and bad configs,
//! `fetch x509 --write`, `fetch bundle`, `healthcheck`, SIGTERM, and
//! `config check`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

fn sigil(args: &[&str]) -> Output {
    Command::new(SIGIL).args(args).output().expect("sigil runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A daemon process started from the binary; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(cmd: &mut Command, socket: &Path) -> Daemon {
    let child = cmd.stderr(Stdio::null()).spawn().expect("sigil run starts");
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "socket {} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

/// `sigil run` with `config` (written to `dir/sigil.toml`), its socket
/// `dir/workload.sock` and state in `dir/state`, once it listens.
fn start_with_config(dir: &Path, config: &str) -> (Daemon, PathBuf) {
    let file = dir.join("sigil.toml");
    std::fs::write(&file, config).unwrap();
    let socket = dir.join("workload.sock");
    let daemon = start_daemon(
        Command::new(SIGIL)
            .args(["run", "--config"])
            .arg(&file)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state")),
        &socket,
    );
    (daemon, socket)
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[test]
fn each_bad_config_is_refused_with_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "trust_domain = \"Not Valid\"\n[[entry]]\nname=\"a\"\nselectors=[\"unix:uid:1\"]",
            "trust_domain",
        ),
        (
            "trust_domain = \"a.org\"\n[[entry]]\nname=\"a\"\nselectors=[\"unix:uid:x\"]",
            "selectors[0]",
        ),
        (
            "trust_domain = \"a.org\"\n[[entry]]\nname=\"a\"\nselectors=[\"unix:uid:1\"]\nttl=\"forever\"",
            "ttl",
        ),
        (
            "trust_domain = \"a.org\"\n[[entry]]\nname=\"a\"\nselectors=[]",
            "selectors",
        ),
        ("trust_domain = \"a.org\"\nsocket = \"/x\"", "unknown field"),
        ("this is not toml", "expected"),
        ("trust_domain = \"a.org\"", "no [[entry]]"),
    ];
    for (i, (content, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, content).unwrap();
        let out = sigil(&["run", "--config", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(
            stderr.contains(path.to_str().unwrap()),
            "case {i}: no file in {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "case {i}: {expected:?} not in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "case {i} panicked: {stderr}");
    }
    let out = sigil(&["run", "--config", "/nonexistent/sigil.toml"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/sigil.toml"));
}

#[test]
fn fetch_writes_pem_files_that_openssl_verifies_and_sigterm_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("w.sock");
    let config = dir.path().join("sigil.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"cli.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n", uid()),
    )
    .unwrap();
    let mut daemon = start_daemon(
        Command::new(SIGIL)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state")),
        &socket,
    );
    let socket_arg = format!("unix://{}", socket.display());

    let health = sigil(&["healthcheck", "--socket", &socket_arg]);
    assert!(health.status.success(), "{}", text(&health.stdout));
    assert!(text(&health.stdout).contains("serving the Workload API"));

    let out_dir = dir.path().join("out");
    let fetch = sigil(&[
        "fetch",
        "x509",
        "--socket",
        &socket_arg,
        "--write",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = text(&fetch.stdout);
    assert!(fetch.status.success(), "{}{}", stdout, text(&fetch.stderr));
    assert!(
        stdout.contains("spiffe://cli.test/agent/me/instance/"),
        "{stdout}"
    );
    assert!(stdout.contains("Hint:       instance"), "{stdout}");
    let key_mode = std::fs::metadata(out_dir.join("svid_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let bundle_out = sigil(&["fetch", "bundle", "--socket", &socket_arg, "--json"]);
    assert!(text(&bundle_out.stdout).contains("spiffe://cli.test"));

    if let Ok(verify) = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
    {
        assert!(
            verify.status.success(),
            "openssl: {}{}",
            text(&verify.stdout),
            text(&verify.stderr)
        );
        let key = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(out_dir.join("svid_key.pem"))
            .output()
            .unwrap();
        let cert = Command::new("openssl")
            .args(["x509", "-pubkey", "-noout", "-in"])
            .arg(out_dir.join("svid.pem"))
            .output()
            .unwrap();
        assert_eq!(
            key.stdout, cert.stdout,
            "the key belongs to the certificate"
        );
    } else {
        eprintln!("openssl not installed: skipped the openssl cross-check");
    }

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&daemon.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(!socket.exists(), "socket removed on exit");
    let health = sigil(&["healthcheck", "--socket", &socket_arg]);
    assert!(!health.status.success());
}

#[test]
fn run_without_a_config_serves_the_current_user_from_its_runtime_dir() {
    let runtime = tempfile::tempdir().unwrap();
    let socket: PathBuf = runtime.path().join("sigil/workload.sock");
    let state = runtime.path().join("state-home/sigil");
    let mut cmd = Command::new(SIGIL);
    cmd.arg("run")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("XDG_STATE_HOME", runtime.path().join("state-home"));
    if uid() == 0 {
        // root's defaults are /run/sigil and /var/lib/sigil: keep the test
        // out of them with the environment overrides.
        cmd.env("SIGIL_SOCKET", &socket)
            .env("SIGIL_STATE_DIR", &state);
    }
    let _daemon = start_daemon(&mut cmd, &socket);
    let out = Command::new(SIGIL)
        .args(["fetch", "x509", "--json"])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\"spiffe_id\": \"spiffe://sigil.local/agent/"),
        "{stdout}"
    );
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state dir is private");
    let sock_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o777, "workload socket is open to all");
}

#[test]
fn a_corrupt_store_stops_the_daemon_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let db = state.join("sigil.db");
    let garbage = b"this is not a database, but someone's precious file".repeat(100);
    std::fs::write(&db, &garbage).unwrap();
    let config = dir.path().join("sigil.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"cli.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n", uid()),
    )
    .unwrap();
    let out = Command::new(SIGIL)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(dir.path().join("w.sock"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("corrupt") && stderr.contains("sigil.db"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "the file is untouched"
    );
}

#[test]
fn config_check_accepts_a_valid_file_and_summarises_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.toml");
    std::fs::write(
        &path,
        "trust_domain = \"agents.example.org\"\n[workload_api]\nsocket = \"/run/sigil/workload.sock\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n[[entry]]\nname = \"a\"\nowner = \"team-a\"\nselectors = [\"unix:uid:1\"]\n[[entry]]\nname = \"b\"\nselectors = [\"unix:uid:2\"]\n",
    )
    .unwrap();
    let out = sigil(&["config", "check", "--config", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        stdout.trim_end(),
        format!(
            "{}: valid: trust domain agents.example.org, 2 entries, workload socket /run/sigil/workload.sock, admin socket /run/sigil/admin.sock, metrics on 127.0.0.1:9464",
            path.display()
        )
    );
    let defaults = Command::new(SIGIL)
        .args(["config", "check"])
        .env_remove("SIGIL_CONFIG")
        .output()
        .unwrap();
    assert!(defaults.status.success(), "{}", text(&defaults.stderr));
    assert!(
        text(&defaults.stdout)
            .starts_with("<embedded defaults>: valid: trust domain sigil.local, 1 entry"),
        "{}",
        text(&defaults.stdout)
    );
}

#[test]
fn config_check_and_run_print_every_mistake_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "trust_domain = \"a.org\"\n[admin_api]\nsocket = \"admin.sock\"\n[metrics]\nlisten = \"nowhere\"\n[[entry]]\nname = \"a\"\nowner = \"\"\nselectors = [\"unix:uid:x\"]\n[[entry]]\nname = \"b\"\nselectors = [\"unix:uid:2\"]\nttl = \"forever\"\n",
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let fields = [
        "admin_api.socket",
        "metrics.listen",
        "entry \"a\".owner",
        "entry \"a\".selectors[0]",
        "entry \"b\".ttl",
    ];
    let check = sigil(&["config", "check", "--config", file]);
    assert_eq!(check.status.code(), Some(1));
    let stderr = text(&check.stderr);
    for field in fields {
        let line = format!("{file}: {field}: ");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with(&line)).count(),
            1,
            "{line:?} not on a line of its own in {stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("{file}: invalid: 5 problems")),
        "{stderr}"
    );

    let run = sigil(&["run", "--config", file]);
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains("(5 problems)"), "{stderr}");
    for field in fields {
        let line = format!("{file}: {field}: ");
        assert!(
            stderr.lines().any(|l| l.starts_with(&line)),
            "{line:?} not on a line of its own in {stderr}"
        );
    }

    let missing = sigil(&["config", "check", "--config", "/nonexistent/sigil.toml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("cannot read config file /nonexistent/sigil.toml"));
}

#[test]
fn a_client_whose_reader_went_away_stops_quietly_instead_of_panicking() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(SIGIL)
        .args(["config", "check"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(13),
        "ended by SIGPIPE, as `cat` is"
    );
}

/// A client cannot keep the daemon hashing: a sparse executable of 2 GiB
/// (no disk used) is refused at once instead of read to the end, and the
/// daemon goes on serving.
#[test]
fn a_huge_sparse_executable_is_refused_without_being_hashed() {
    let dir = tempfile::tempdir().unwrap();
    // A sha256 entry makes the daemon hash every caller's executable.
    let (_daemon, socket) = start_with_config(
        dir.path(),
        &format!(
            "trust_domain = \"cli.test\"\n\
             [[entry]]\nname = \"pinned\"\nselectors = [\"unix:sha256:{}\"]\n\
             [[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n",
            "0".repeat(64),
            uid()
        ),
    );
    let socket_arg = format!("unix://{}", socket.display());
    let huge = dir.path().join("sigil-huge");
    std::fs::copy(SIGIL, &huge).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&huge).unwrap();
    file.set_len(2 << 30).unwrap();
    drop(file);
    let started = Instant::now();
    let out = Command::new(&huge)
        .args(["fetch", "x509", "--socket", &socket_arg])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("over the 1073741824 the daemon will hash"),
        "{}",
        text(&out.stderr)
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    let fetch = sigil(&["fetch", "x509", "--socket", &socket_arg]);
    assert!(fetch.status.success(), "{}", text(&fetch.stderr));
}

#[test]
fn logs_written_to_a_file_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let log = dir.path().join("sigil.log");
    let child = Command::new(SIGIL)
        .arg("run")
        .env("SIGIL_SOCKET", &socket)
        .env("SIGIL_STATE_DIR", dir.path().join("state"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&daemon.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    daemon.0.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" INFO "), "the daemon logged: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI escape codes in a log file: {text:?}"
    );
}

/// `sigil fetch x509` as uid `as_uid` (root only) or as this user.
fn fetch_as(as_uid: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = match as_uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                SIGIL,
            ]);
            c
        }
        None => Command::new(SIGIL),
    };
    cmd.args(["fetch", "x509"])
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap()
}

/// The one line a failed command printed, checked to be one line with
/// `phrase` once and no repeated OS error.
fn one_error(out: &Output, phrase: &str) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(err.matches(phrase).count(), 1, "{phrase:?} once in: {err}");
    assert!(!err.contains("os error"), "no raw OS error: {err}");
    err
}

#[test]
fn client_errors_say_what_is_wrong_once_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();

    let err = one_error(
        &fetch_as(None, &["--socket", &p("missing.sock")]),
        "no socket at",
    );
    assert!(err.contains("start the daemon (`sigil run`)"), "{err}");
    std::fs::write(p("file"), "").unwrap();
    let err = one_error(
        &fetch_as(None, &["--socket", &p("file")]),
        "is a regular file, not a socket",
    );
    assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
    one_error(
        &fetch_as(None, &["--socket", &dir.path().display().to_string()]),
        "is a directory, not a socket",
    );
    // The helper, which retries while a daemon is away, stops at once on
    // a path that is not a socket.
    let mut helper = Command::new(SIGIL)
        .args([
            "helper",
            "--dir",
            &p("helper-files"),
            "--socket",
            &p("file"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = helper.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = helper.kill();
            panic!("sigil helper kept retrying a regular file as its socket");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut helper.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("is a regular file, not a socket"), "{err}");
    // The gate reaches the socket the same way.
    {
        let args = [
            "gate",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
            "--allow",
            "spiffe://t.test",
        ];
        let out = Command::new(SIGIL)
            .args(args)
            .args(["--socket", &p("file")])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("is a regular file, not a socket"),
            "{args:?}: {err}"
        );
    }
    drop(std::os::unix::net::UnixListener::bind(p("stale.sock")).unwrap());
    one_error(
        &fetch_as(None, &["--socket", &p("stale.sock")]),
        "nothing answers on",
    );

    // A daemon that admits nobody here: its refusal, in its words.
    let (_daemon, socket) = start_with_config(
        dir.path(),
        "trust_domain = \"t.test\"\n[[entry]]\nname = \"x\"\nselectors = [\"unix:uid:4242\"]\n",
    );
    let err = one_error(
        &fetch_as(None, &["--socket", &socket.display().to_string()]),
        "the daemon refused (PermissionDenied): no identity issued",
    );
    assert!(err.contains("matches no registration entry"), "{err}");

    // --write onto a file: refused before anything is fetched or printed.
    let out = fetch_as(
        None,
        &[
            "--socket",
            &socket.display().to_string(),
            "--write",
            &p("file"),
        ],
    );
    one_error(&out, "exists and is not a directory");
    assert!(
        out.stdout.is_empty(),
        "nothing printed first: {}",
        text(&out.stdout)
    );

    // Permission denied: a socket in a directory only root may enter.
    if uid() != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("not root (or no setpriv): skipped the permission-denied case");
        return;
    }
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = private.path().join("w.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&hidden).unwrap();
    let err = one_error(
        &fetch_as(Some(65534), &["--socket", &hidden.display().to_string()]),
        "permission denied on",
    );
    assert!(err.contains("for uid 65534"), "{err}");
}

#[test]
fn readiness_reaches_systemd_once_the_socket_serves() {
    let dir = tempfile::tempdir().unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let socket = dir.path().join("workload.sock");
    let child = Command::new(SIGIL)
        .arg("run")
        .env("SIGIL_SOCKET", &socket)
        .env("SIGIL_STATE_DIR", dir.path().join("state"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let mut buf = [0u8; 512];
    let n = notify
        .recv(&mut buf)
        .expect("a readiness message within 15 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    // Ready means serving: a client connecting now is answered.
    let out = Command::new(SIGIL)
        .args(["fetch", "x509", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&daemon.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("a stopping message");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn the_trust_domain_changes_by_the_documented_procedure() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let state = dir.path().join("state");
    let config = |td: &str| {
        let path = dir.path().join(format!("{td}.toml"));
        std::fs::write(
            &path,
            format!(
                "trust_domain = \"{td}\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n",
                uid()
            ),
        )
        .unwrap();
        path
    };
    let run = |td: &str| {
        let mut cmd = Command::new(SIGIL);
        cmd.args(["run", "--config"])
            .arg(config(td))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state);
        cmd
    };
    let fetched_id = || {
        let out = Command::new(SIGIL)
            .args(["fetch", "x509", "--json", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    {
        let _daemon = start_daemon(&mut run("old.test"), &socket);
        assert!(fetched_id().contains("spiffe://old.test/agent/me/"));
    }
    let _ = std::fs::remove_file(&socket);
    // Another trust domain on the same state: refused, saying what to do.
    let out = run("new.test").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("move {} aside", state.display()))
            && err.contains("README: Changing the trust domain"),
        "{err}"
    );
    // The procedure: move the state aside, start again.
    let retired = dir.path().join("state.old.test");
    std::fs::rename(&state, &retired).unwrap();
    let _daemon = start_daemon(&mut run("new.test"), &socket);
    assert!(fetched_id().contains("spiffe://new.test/agent/me/"));
    assert!(
        retired.join("ca/ca_cert.pem").exists() && retired.join("sigil.db").exists(),
        "the old CA, store and audit trail are kept"
    );
}
