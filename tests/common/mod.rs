//! The integration-test harness: a real daemon, in process, on a real socket.
//!
//! `TestDaemon` builds the daemon exactly as `sigil run` does (`App::build`
//! then `App::run`) with a temporary state directory and socket, so tests
//! talk to it over the Unix socket like any agent would, and may also look
//! at its state (`identity()`) to check what it did.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

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
        };
        let config = Config::parse(toml, "test.toml", &overrides).expect("valid test config");
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
