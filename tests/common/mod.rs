//! The integration-test harness: a real daemon, in process, on a real socket.
//!
//! `TestDaemon` builds the daemon exactly as `sigil run` does (`App::build`
//! then `App::run`) with a temporary state directory and socket, so tests
//! talk to it over the Unix socket like any agent would, and may also look
//! at its state (`identity()`) to check what it did.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

pub mod agent;
pub mod venv;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil::app::App;
use sigil::config::{Config, Overrides};
use sigil::identity::IdentityManager;
use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::shutdown::Shutdown;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The trust domain test configs use.
pub const TRUST_DOMAIN: &str = "sigil.test";

/// A running daemon with its own state directory and socket.
pub struct TestDaemon {
    /// Holds the socket and state; removed on drop.
    pub dir: TempDir,
    /// The workload socket.
    pub socket: PathBuf,
    /// The admin socket (the default: beside the workload socket).
    pub admin_socket: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    identity: IdentityManager,
    store: std::sync::Arc<sigil::store::Store>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// A config admitting this test process by its uid, as entry `tester`.
pub fn config_for_me(extra: &str) -> String {
    format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\n{extra}\n[[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{}\"]\n",
        nix::unistd::geteuid()
    )
}

impl TestDaemon {
    /// Starts a daemon admitting this process (entry `tester`).
    pub async fn start() -> Self {
        Self::start_with(&config_for_me("")).await
    }

    /// Starts a daemon with this config text (socket and state dir are set
    /// by the harness).
    pub async fn start_with(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, toml).await
    }

    /// Starts a daemon on an existing directory (to test restarts).
    pub async fn start_in(dir: TempDir, toml: &str) -> Self {
        let socket = dir.path().join("workload.sock");
        let state_dir = dir.path().join("state");
        let overrides = Overrides {
            socket: Some(socket.clone()),
            state_dir: Some(state_dir.clone()),
            admin_socket: None,
        };
        let config = Config::parse(toml, "test.toml", &overrides).expect("valid test config");
        let admin_socket = config.admin.socket.clone();
        let shutdown = Shutdown::new();
        let app = App::build(config, &shutdown).await.expect("daemon starts");
        let identity = app.identity().clone();
        let store = app.store().clone();
        let run_shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            app.run(run_shutdown).await.expect("daemon serves");
        });
        Self {
            dir,
            socket,
            admin_socket,
            state_dir,
            identity,
            store,
            shutdown,
            task,
        }
    }

    /// The endpoint as SPIFFE clients take it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's identity manager, to check its state.
    pub fn identity(&self) -> &IdentityManager {
        &self.identity
    }

    /// The daemon's store, to check what it recorded.
    pub fn store(&self) -> &sigil::store::Store {
        &self.store
    }

    /// Stops the daemon (as on SIGTERM) and returns its directory.
    pub async fn stop(self) -> TempDir {
        assert!(
            self.shutdown.drain(Duration::from_secs(5)).await,
            "every task ended within the grace period"
        );
        self.task.await.expect("daemon task ends cleanly");
        self.dir
    }
}

/// A gRPC channel to the daemon's socket.
pub async fn channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connects")
}

/// An admin API client on the daemon's admin socket.
pub async fn admin_client(
    daemon: &TestDaemon,
) -> sigil::proto::sigil::admin::v1::admin_client::AdminClient<Channel> {
    sigil::proto::sigil::admin::v1::admin_client::AdminClient::new(
        channel(&daemon.admin_socket).await,
    )
}

/// A raw Workload API client (our generated one) on `socket`.
pub async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel(socket).await)
}

/// A client of Sigil's task extension on `socket`.
pub async fn tasks_client(socket: &Path) -> TasksClient<Channel> {
    TasksClient::new(channel(socket).await)
}

/// A raw client over an already connected stream (e.g. one a child process
/// connected, so the daemon attests the child).
pub async fn client_over(stream: UnixStream) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel_over(stream).await)
}

/// A channel over an already connected stream.
pub async fn channel_over(stream: UnixStream) -> Channel {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(stream)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = slot.lock().unwrap().take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the handed-over stream is used up"))
            }
        }))
        .await
        .expect("connects over the stream")
}

/// A request with the `workload.spiffe.io: true` header.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

/// Waits until `check` holds, polling every 20 ms, up to `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// The serials (lower-case hex) a DER CRL lists.
pub fn crl_serials(crl: &[u8]) -> Vec<String> {
    let (_, parsed) = x509_parser::parse_x509_crl(crl).expect("a CRL");
    parsed
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect()
}

/// The serial (lower-case hex) of a DER certificate.
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    hex::encode(cert.raw_serial())
}

/// Reads a stream past any further messages to how it ends: `None` for a
/// clean end, `Some(Err(status))` for an error.
pub async fn stream_end<T>(stream: &mut tonic::Streaming<T>) -> Option<Result<T, tonic::Status>> {
    use tokio_stream::StreamExt;
    loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            other => return other,
        }
    }
}

/// The first message of a FetchX509SVID stream.
pub async fn first_x509(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> sigil::proto::workload::X509svidResponse {
    use tokio_stream::StreamExt;
    let request = with_header(sigil::proto::workload::X509svidRequest {});
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    stream.next().await.expect("a first message").unwrap()
}

/// The first message of a FetchX509Bundles stream.
pub async fn first_bundles(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> sigil::proto::workload::X509BundlesResponse {
    use tokio_stream::StreamExt;
    let request = with_header(sigil::proto::workload::X509BundlesRequest {});
    let mut stream = client
        .fetch_x509_bundles(request)
        .await
        .unwrap()
        .into_inner();
    stream.next().await.expect("a first message").unwrap()
}

// --- Hostile local clients (issue 11), used by tests/attack_*.rs -----------------------

/// The uid the attacks run as when the suite runs as root.
pub const NOBODY: u32 = 65534;

/// The raw HTTP/2 attack client (python, standard library only).
pub const ATTACK_SCRIPT: &str = include_str!("../attack/h2attack.py");

/// Set this variable to run the attack tests with configs that leave out the
/// limit keys issue 11 adds (`max_connections_per_uid`, `handshake_timeout`,
/// ...), so the attacks can be seen succeeding against a daemon that does not
/// know those keys yet.
pub const LEGACY_CONFIG_VAR: &str = "SIGIL_ATTACK_LEGACY_CONFIG";

/// `text` (config lines for issue 11's limits), or nothing when
/// [`LEGACY_CONFIG_VAR`] is set.
pub fn limits(text: &str) -> String {
    if std::env::var_os(LEGACY_CONFIG_VAR).is_some() {
        eprintln!("{LEGACY_CONFIG_VAR} is set: running without the limit keys ({text:?})");
        String::new()
    } else {
        text.to_owned()
    }
}

/// Starts a daemon whose temp directory every user may traverse (0755), so
/// an attacker running as [`NOBODY`] reaches the socket (itself 0777) and
/// the attack script. The state directory stays private (checked).
pub async fn start_reachable(toml: &str) -> TestDaemon {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temp dir");
    let script = dir.path().join("h2attack.py");
    std::fs::write(&script, ATTACK_SCRIPT).expect("write the attack script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))
        .expect("chmod the attack script");
    let daemon = TestDaemon::start_in(dir, toml).await;
    let state_mode = std::fs::metadata(&daemon.state_dir)
        .expect("the state dir exists")
        .permissions()
        .mode();
    assert_eq!(
        state_mode & 0o077,
        0,
        "the state dir is not reachable by other users (mode {state_mode:o})"
    );
    daemon
}

/// The python every attack runs with (a system path `nobody` can execute).
pub const ATTACK_PYTHON: &str = "/usr/bin/python3";

/// Why attacks as [`NOBODY`] cannot run here, if they cannot: the suite is
/// not root, or neither `setpriv` nor `runuser` nor python3 is there.
pub fn cannot_run_as_nobody() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root, so the attacker cannot run as uid 65534".into());
    }
    if !Path::new(ATTACK_PYTHON).exists() {
        return Some(format!("{ATTACK_PYTHON} is missing"));
    }
    if !Path::new("/usr/bin/setpriv").exists() && !Path::new("/usr/sbin/runuser").exists() {
        return Some("neither setpriv nor runuser is installed".into());
    }
    None
}

/// An attack script run as a child process group; killed (with every
/// process it forked) when dropped.
pub struct Attacker {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Attacker {
    /// Runs `h2attack.py args...` from the daemon's directory, as
    /// [`NOBODY`] when `as_nobody`, else as this process's user.
    pub fn spawn(daemon: &TestDaemon, as_nobody: bool, args: &[&str]) -> Self {
        Self::spawn_in(daemon.dir.path(), as_nobody, args)
    }

    /// Runs `dir/h2attack.py args...` (see [`Attacker::spawn`]).
    pub fn spawn_in(dir: &Path, as_nobody: bool, args: &[&str]) -> Self {
        use std::io::{BufRead, Read};
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let script = dir.join("h2attack.py");
        let mut cmd = if !as_nobody {
            Command::new(ATTACK_PYTHON)
        } else if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                ATTACK_PYTHON.into(),
            ]);
            c
        } else {
            let mut c = Command::new("/usr/sbin/runuser");
            c.args(["-u", "nobody", "--", ATTACK_PYTHON]);
            c
        };
        cmd.arg("-I")
            .arg(&script)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("the attack script starts");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    /// The next line the script prints, waiting up to `limit` without
    /// blocking the runtime the daemon runs on; `None` at its end or on time out.
    pub async fn line(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Some(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next JSON line the script prints (other lines are skipped).
    pub async fn json(&mut self, limit: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(line) = self.line(left).await else {
                // Give the stderr reader a moment to collect the traceback.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "the attack script printed no JSON line within {limit:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            };
            if let Ok(value) = serde_json::from_str(line.trim()) {
                return value;
            }
            eprintln!("attack script: {line}");
        }
    }

    /// Writes a line to the script's stdin.
    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// What the script printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let pgid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pgid) = pgid {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one attack to its end and returns the JSON line it printed.
pub async fn run_attack(
    daemon: &TestDaemon,
    as_nobody: bool,
    args: &[&str],
    limit: Duration,
) -> serde_json::Value {
    let mut attacker = Attacker::spawn(daemon, as_nobody, args);
    attacker.json(limit).await
}

/// This process's resident set size in KiB (the daemon runs in it).
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// CPU time (user + system) this process has used; the daemon runs in it.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start at field 3;
    // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The refusal rows the daemon's audit trail holds for callers of `uid`.
pub fn refusals_of(daemon: &TestDaemon, uid: u32) -> Vec<sigil::store::AuditEvent> {
    let query = sigil::store::AuditQuery {
        kind: Some(sigil::store::AuditKind::Refusal),
        ..Default::default()
    };
    let needle = format!("uid:{uid}");
    daemon
        .store()
        .audit(&query)
        .expect("the audit trail reads")
        .into_iter()
        .filter(|e| e.actor.split_whitespace().any(|w| w == needle))
        .collect()
}
