//! The single wiring point: config in, a serving daemon out.
//!
//! [`App::build`] does everything that can fail at start-up (socket, state
//! dir, store, CA) so errors surface before anything is served;
//! [`App::run`] serves until shutdown. Integration tests run the same two
//! calls in process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UnixListener;

use crate::admin_api::{self, Access, AdminContext};
use crate::attest::{self, Attestor};
use crate::ca::{self, Ca};
use crate::config::Config;
use crate::fsutil;
use crate::identity::{self, IdentityManager, LoadedEntry, Parts};
use crate::shutdown::Shutdown;
use crate::store::{self, Store};
use crate::workload_api;

/// Mode of the workload socket: anyone may connect; attestation decides
/// what they get.
pub const WORKLOAD_SOCKET_MODE: u32 = 0o777;
/// Mode of a socket directory the daemon creates.
pub const SOCKET_DIR_MODE: u32 = 0o755;
/// Mode of the admin socket: the daemon's user only...
pub const ADMIN_SOCKET_MODE: u32 = 0o600;
/// ...or its user and `[admin_api] group`.
pub const ADMIN_SOCKET_GROUP_MODE: u32 = 0o660;

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
    /// The admin socket cannot be bound or given its group.
    #[error("the admin socket cannot be served: {0}")]
    AdminSocket(fsutil::Error),
    /// The admin API server failed.
    #[error(transparent)]
    AdminApi(#[from] admin_api::Error),
    /// The metrics listener cannot be bound.
    #[error("cannot listen for metrics on {addr} (metrics.listen): {source}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: Arc<std::io::Error>,
    },
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
    config: Arc<Config>,
    identity: IdentityManager,
    store: Arc<Store>,
    ca: Arc<Ca>,
    listener: UnixListener,
    admin_listener: UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
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
        let admin_socket = config.admin.socket.clone();
        let built = match bind_admin_socket(&config).await {
            Ok(admin) => {
                let built = Self::build_with(config, listener, admin, shutdown).await;
                if built.is_err() {
                    let _ = std::fs::remove_file(&admin_socket);
                }
                built
            }
            Err(e) => Err(e),
        };
        if built.is_err() {
            // The socket is ours (just bound); do not leave it behind.
            let _ = std::fs::remove_file(&socket);
        }
        built
    }

    async fn build_with(
        config: Config,
        listener: UnixListener,
        admin_listener: UnixListener,
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
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => {
                Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| Error::Metrics {
                            addr,
                            source: Arc::new(e),
                        })?,
                )
            }
        };
        crate::metrics::global().set_ca_expiry(ca.not_after());
        let mut parts = Parts::from_config(&config, Attestor::new()?, ca.clone(), store.clone());
        parts.stored_entries = stored_entries(&store, &config).await?;
        let identity =
            IdentityManager::new(parts, shutdown.token.clone(), shutdown.tracker.clone());
        identity.restore().await?;
        Ok(Self {
            config: Arc::new(config),
            identity,
            store,
            ca,
            listener,
            admin_listener,
            metrics_listener,
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
        let admin_socket = self.config.admin.socket.clone();
        let admin = AdminContext {
            identity: self.identity.clone(),
            store: self.store.clone(),
            ca: self.ca.clone(),
            config: self.config.clone(),
            access: Access {
                daemon_uid: nix::unistd::geteuid().as_raw(),
                allowed_uids: self.config.admin.allowed_uids.clone(),
                group: self.config.admin.group.as_ref().map(|g| g.gid),
            },
            started_at: std::time::SystemTime::now(),
            shutdown: shutdown.token.clone(),
        };
        let admin_serving = shutdown
            .tracker
            .spawn(admin_api::serve(self.admin_listener, admin));
        let serving = Arc::new(AtomicBool::new(false));
        if let Some(listener) = self.metrics_listener {
            let health = Arc::new(AppHealth {
                serving: serving.clone(),
                store: self.store.clone(),
                ca: self.ca.clone(),
                last: tokio::sync::Mutex::new(None),
            });
            tracing::info!(listen = %self.config.metrics_listen.map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /livez and /readyz");
            shutdown.tracker.spawn(crate::metrics::http::serve(
                listener,
                health,
                shutdown.token.clone(),
            ));
            shutdown.tracker.spawn(refresh_gauges(
                self.identity.clone(),
                shutdown.token.clone(),
            ));
        }
        shutdown.tracker.spawn(reload_on_hangup(
            self.config.clone(),
            self.identity.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            config = %self.config.source,
            trust_domain = %self.config.trust_domain,
            state_dir = %self.config.state_dir.display(),
            ca = %self.config.state_dir.join(crate::ca::CA_DIR).display(),
            store = %self.config.state_dir.join(crate::store::DB_FILE).display(),
            entries = self.config.entries.len(),
            instance_ttl = %humantime::format_duration(self.config.instance_ttl),
            endpoint = %format!("unix://{}", socket.display()),
            admin_socket = %admin_socket.display(),
            "serving the SPIFFE Workload API"
        );
        serving.store(true, Ordering::Release);
        // Under systemd (Type=notify): ready now, the socket is bound and
        // its accept loop starts next. Nothing happens without NOTIFY_SOCKET.
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving the SPIFFE Workload API"),
        ]);
        let result = workload_api::serve(
            self.listener,
            self.identity,
            self.config.limits,
            shutdown.token.clone(),
            shutdown.tracker.clone(),
        )
        .await;
        serving.store(false, Ordering::Release);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        let _ = std::fs::remove_file(&socket);
        shutdown.token.cancel();
        // Admin streams end on shutdown; a connection that does not close
        // (a client that stopped reading) gets the workload socket's grace.
        let admin_result = match tokio::time::timeout(workload_api::CONNECTION_GRACE, admin_serving)
            .await
        {
            Ok(joined) => joined.unwrap_or(Ok(())),
            Err(_) => {
                tracing::warn!("admin connections still open after the grace period were dropped");
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&admin_socket);
        result?;
        Ok(admin_result?)
    }
}

/// What `/readyz` checks: the workload socket is served, the store takes a
/// write (a real one, so a full disk or a read-only file shows), and the CA
/// has not expired.
struct AppHealth {
    serving: Arc<AtomicBool>,
    store: Arc<Store>,
    ca: Arc<Ca>,
    /// The last answer and when: probes within [`READY_CACHE`] share it,
    /// so `/readyz` (open to local users) costs at most one store write a
    /// second however hard it is asked.
    last: tokio::sync::Mutex<Option<(std::time::Instant, crate::metrics::http::Readiness)>>,
}

/// How long one readiness answer is reused.
const READY_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

impl crate::metrics::http::Health for AppHealth {
    fn check(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = crate::metrics::http::Readiness> + Send + '_>,
    > {
        Box::pin(async move {
            // One check at a time; the others wait and reuse its answer.
            let mut last = self.last.lock().await;
            if let Some((at, answer)) = &*last
                && at.elapsed() < READY_CACHE
            {
                return answer.clone();
            }
            let answer = self.check_now().await;
            *last = Some((std::time::Instant::now(), answer.clone()));
            answer
        })
    }
}

impl AppHealth {
    async fn check_now(&self) -> crate::metrics::http::Readiness {
        let mut failing = Vec::new();
        if !self.serving.load(Ordering::Acquire) {
            failing.push("the workload socket is not served".to_owned());
        }
        let now = std::time::SystemTime::now();
        if let Err(e) = self.store.write_async(move |tx| tx.touch_health(now)).await {
            failing.push(format!("the store is not writable: {e}"));
        }
        if self.ca.not_after() <= now {
            failing.push(format!(
                "the CA expired at {}",
                humantime::format_rfc3339_seconds(self.ca.not_after())
            ));
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }
}

/// How often the live instance and task gauges are refreshed.
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the live instance and task gauges current while metrics are
/// served (counters move where things happen; these are counted here).
async fn refresh_gauges(identity: IdentityManager, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        let sets = identity.live_sets();
        let tasks = sets.iter().map(|s| s.tasks.len()).sum();
        crate::metrics::global().set_live(sets.len(), tasks);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GAUGE_REFRESH) => {}
        }
    }
}

/// Binds the admin socket: 0600 for the daemon's user, or 0660 and owned
/// by `[admin_api] group`; `[admin_api] allowed_uids` get an ACL entry
/// each. Never world-accessible. Its directory gets the workload socket's
/// checks.
async fn bind_admin_socket(config: &Config) -> Result<UnixListener, Error> {
    let path = &config.admin.socket;
    let group = config.admin.group.as_ref();
    let mode = if group.is_some() {
        ADMIN_SOCKET_GROUP_MODE
    } else {
        ADMIN_SOCKET_MODE
    };
    let listener = fsutil::bind_socket(path, mode, SOCKET_DIR_MODE)
        .await
        .map_err(Error::AdminSocket)?;
    let granted = fsutil::grant_users(path, &config.admin.allowed_uids, group.is_some());
    if let Err(e) = granted {
        let _ = std::fs::remove_file(path);
        return Err(Error::AdminSocket(e));
    }
    if let Some(group) = group
        && let Err(e) = std::os::unix::fs::chown(path, None, Some(group.gid))
    {
        let _ = std::fs::remove_file(path);
        return Err(Error::AdminSocket(fsutil::Error::Io {
            action: "give the admin group (the daemon's user must be root or a member of it)",
            path: path.clone(),
            source: Arc::new(e),
        }));
    }
    Ok(listener)
}

/// The entries created over the admin API, read back and validated again
/// exactly like config entries. One that no longer validates (a newer
/// rule) is skipped with an error in the log, not fatal: the daemon must
/// still serve everyone else.
async fn stored_entries(store: &Arc<Store>, config: &Config) -> Result<Vec<LoadedEntry>, Error> {
    let stored = store.read_async(|s| s.stored_entries()).await?;
    let mut loaded = Vec::with_capacity(stored.len());
    for record in stored {
        let entry = serde_json::from_str::<crate::config::EntrySpec>(&record.spec_json)
            .map_err(|e| e.to_string())
            .and_then(|spec| {
                crate::config::validate_entry(&spec, &config.trust_domain)
                    .map_err(|e| e.to_string())
            });
        match entry {
            Ok(entry) => loaded.push(LoadedEntry {
                entry,
                created_at: record.created_at,
                created_by: record.created_by,
            }),
            Err(e) => {
                tracing::error!(entry = %record.name, error = %e, "a stored entry is invalid and is not in force: delete it (`sigil entries delete`) and create it again")
            }
        }
    }
    Ok(loaded)
}

/// Tells systemd the daemon's state when it runs as a `Type=notify`
/// service (`NOTIFY_SOCKET` set); a failure is logged, never fatal.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// On each SIGHUP, reads the config file again and puts its entries in
/// force: the diff is logged, and the SVIDs of removed or changed entries
/// are revoked as if deleted. An invalid file is refused with every
/// problem logged, and the running config stays. Settings other than the
/// entries need a restart (said in the log when they changed).
async fn reload_on_hangup(config: Arc<Config>, identity: IdentityManager, shutdown: Shutdown) {
    loop {
        tokio::select! {
            () = shutdown.token.cancelled() => return,
            () = shutdown.hangups.notified() => {}
        }
        if config.source == crate::config::EMBEDDED {
            tracing::info!(
                "SIGHUP: the daemon runs on its embedded defaults; there is no file to reload"
            );
            continue;
        }
        let path = std::path::PathBuf::from(&config.source);
        // Reading the file and resolving the admin group (NSS) may block.
        let loaded = tokio::task::spawn_blocking(move || {
            Config::load(Some(&path), &crate::config::Overrides::default())
        })
        .await;
        let Ok(loaded) = loaded else { return };
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                for problem in e.problems() {
                    tracing::error!(%problem, "SIGHUP: the config file is invalid; the running config stays");
                }
                continue;
            }
        };
        if new.trust_domain != config.trust_domain {
            tracing::error!(running = %config.trust_domain, file = %new.trust_domain, "SIGHUP: the file names another trust domain, which needs a restart (and a new CA); the running config stays");
            continue;
        }
        let same_admin = (&new.admin.group, &new.admin.allowed_uids)
            == (&config.admin.group, &config.admin.allowed_uids);
        if (
            new.instance_ttl,
            new.task_ttl,
            new.limits,
            new.metrics_listen,
        ) != (
            config.instance_ttl,
            config.task_ttl,
            config.limits,
            config.metrics_listen,
        ) || !same_admin
        {
            tracing::warn!(
                "SIGHUP: settings other than [[entry]] changed in the file; they take effect at the next restart"
            );
        }
        match identity
            .reload_config_entries(new.entries, "daemon (SIGHUP)")
            .await
        {
            Ok((diff, reconciled)) if diff.is_empty() => {
                tracing::info!(
                    instances = reconciled.len(),
                    "SIGHUP: the entries are unchanged"
                );
            }
            Ok((diff, reconciled)) => {
                tracing::info!(
                    added = ?diff.added,
                    removed = ?diff.removed,
                    changed = ?diff.changed,
                    instances_reconciled = reconciled.len(),
                    "SIGHUP: config entries reloaded"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the new entries were refused; the running config stays")
            }
        }
    }
}

/// Creates the state directory 0700, or checks an existing one is ours, not
/// writable by others, and on a path only root or we can change (it holds
/// the CA key).
fn prepare_state_dir(path: &Path) -> Result<(), Error> {
    fsutil::create_private_dir(path).map_err(Error::StateDir)
}
