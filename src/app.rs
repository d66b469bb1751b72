//! The single wiring point: config in, a serving daemon out.
//!
//! [`App::build`] does everything that can fail at start-up (socket, state
//! dir, store, CA) so errors surface before anything is served;
//! [`App::run`] serves until shutdown. Integration tests run the same two
//! calls in process.

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::attest::{self, Attestor};
use crate::ca::{self, Ca};
use crate::config::Config;
use crate::fsutil;
use crate::identity::{self, IdentityManager, Parts};
use crate::shutdown::Shutdown;
use crate::store::{self, Store};
use crate::workload_api;

/// Mode of the workload socket: anyone may connect; attestation decides
/// what they get.
pub const WORKLOAD_SOCKET_MODE: u32 = 0o777;
/// Mode of a socket directory the daemon creates.
pub const SOCKET_DIR_MODE: u32 = 0o755;

/// Why the daemon could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The workload socket cannot be bound (in use, something else at its
    /// path, an unsafe directory).
    #[error("the workload socket cannot be served: {0}")]
    Socket(fsutil::Error),
    /// The state directory is unsafe or unusable.
    #[error("the state directory cannot hold the CA key and the store: {0}")]
    StateDir(fsutil::Error),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] ca::Error),
    /// The store cannot be opened (corrupt, newer schema, unwritable).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The previous run's instances could not be restored.
    #[error("cannot restore the previous run's instances: {0}")]
    Restore(#[from] identity::Error),
    /// Attestation is unavailable (no /proc?).
    #[error(transparent)]
    Attest(#[from] attest::Error),
    /// The workload socket could not be served.
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::Error),
}

/// Most threads the runtime's blocking pool may grow to, per core. The pool
/// runs attestation (/proc reads) and the holder scans; everything else is
/// async or on the store's writer thread. Bounded, so a burst of clients
/// cannot grow the daemon to hundreds of threads (the default is 512).
pub const BLOCKING_THREADS_PER_CORE: usize = 2;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// The size of the runtime's blocking pool: [`BLOCKING_THREADS_PER_CORE`]
/// per core, plus 2 kept for the store's reads, CRL signing and the holder
/// walker (attestation never takes those).
pub fn blocking_threads() -> usize {
    BLOCKING_THREADS_PER_CORE * cores() + 2
}

/// The daemon's runtime: one worker per core, and a blocking pool of
/// [`blocking_threads`]. With the store's writer, jemalloc's purging thread
/// and the main thread, the daemon never runs more than 3 x cores + 5
/// threads.
///
/// # Errors
/// When the runtime's threads cannot be started.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores())
        .max_blocking_threads(blocking_threads())
        .thread_name("sigil-worker")
        .enable_all()
        .build()
}

/// A daemon ready to serve.
pub struct App {
    config: Config,
    identity: IdentityManager,
    store: Arc<Store>,
    listener: UnixListener,
}

impl App {
    /// Prepares the state directory, the CA, attestation and the socket.
    ///
    /// # Errors
    /// [`Error`] saying which part failed and why.
    pub async fn build(config: Config, shutdown: &Shutdown) -> Result<Self, Error> {
        // The socket first: a second daemon stops here, before it reads or
        // writes anything of the live daemon's state.
        let socket = config.workload_socket.clone();
        let listener = fsutil::bind_socket(&socket, WORKLOAD_SOCKET_MODE, SOCKET_DIR_MODE)
            .await
            .map_err(Error::Socket)?;
        let built = Self::build_with(config, listener, shutdown).await;
        if built.is_err() {
            // The socket is ours (just bound); do not leave it behind.
            let _ = std::fs::remove_file(&socket);
        }
        built
    }

    async fn build_with(
        config: Config,
        listener: UnixListener,
        shutdown: &Shutdown,
    ) -> Result<Self, Error> {
        prepare_state_dir(&config.state_dir)?;
        // The store before the CA: a refused store leaves the directory as
        // it was, and an existing CA means an empty store is a lost one.
        let earlier_run = Ca::existing_file(&config.state_dir);
        let store = Arc::new(Store::open_after(
            &config.state_dir,
            earlier_run.as_deref(),
        )?);
        let ca = Arc::new(Ca::load_or_create(&config.state_dir, &config.trust_domain)?);
        let parts = Parts::from_config(&config, Attestor::new()?, ca, store.clone());
        let identity =
            IdentityManager::new(parts, shutdown.token.clone(), shutdown.tracker.clone());
        identity.restore().await?;
        Ok(Self {
            config,
            identity,
            store,
            listener,
        })
    }

    /// The identity manager (for in-process tests and future admin wiring).
    pub fn identity(&self) -> &IdentityManager {
        &self.identity
    }

    /// The durable store (for in-process tests and future admin wiring).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves the Workload API until `shutdown` is cancelled, then removes
    /// the socket.
    ///
    /// # Errors
    /// [`Error::WorkloadApi`] when the server fails.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        let socket = self.config.workload_socket.clone();
        tracing::info!(
            config = %self.config.source,
            trust_domain = %self.config.trust_domain,
            state_dir = %self.config.state_dir.display(),
            entries = self.config.entries.len(),
            instance_ttl = %humantime::format_duration(self.config.instance_ttl),
            endpoint = %format!("unix://{}", socket.display()),
            "serving the SPIFFE Workload API"
        );
        let result = workload_api::serve(
            self.listener,
            self.identity,
            self.config.limits,
            shutdown.token.clone(),
            shutdown.tracker.clone(),
        )
        .await;
        let _ = std::fs::remove_file(&socket);
        Ok(result?)
    }
}

/// Creates the state directory 0700, or checks an existing one is ours, not
/// writable by others, and on a path only root or we can change (it holds
/// the CA key).
fn prepare_state_dir(path: &Path) -> Result<(), Error> {
    fsutil::create_private_dir(path).map_err(Error::StateDir)
}
