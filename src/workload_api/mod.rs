//! The Workload API server on its Unix socket.
//!
//! Owns the socket (creation, permissions, stale-socket cleanup) and the
//! tonic server. The service itself is a thin adapter (`service`); the
//! HTTP/2 `:authority` repair that gRPC C-core clients such as py-spiffe
//! need lives in `authority`.

pub mod authority;
pub mod convert;
pub mod header;
pub mod peer;
pub mod service;
pub mod task;
pub mod track;

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClientLimits;
use crate::identity::IdentityManager;
use crate::proto::sigil::workload::v1::tasks_server::TasksServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

/// Why the socket could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Another process already serves on this socket.
    #[error("another process is already serving on {0}; stop it, or choose another socket path")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// The socket's directory could be tampered with by another user.
    #[error("{path}: {reason}; refusing to serve a socket there")]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Who else could replace the socket.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("the Workload API server failed: {0}")]
    Server(String),
}

/// Largest request message on the workload socket: Workload API requests
/// are nearly empty, and a task Begin with its most attributes (32 of at
/// most 64 + 1024 bytes) fits with room to spare.
pub const MAX_REQUEST_BYTES: usize = 64 << 10; // 64 KiB
/// Largest decoded header list a request may carry (hyper's default, kept
/// explicit: the `:authority` adapter's limits are derived from it).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10; // 16 KiB
/// Longest a request may take to be answered (a streaming call: to get its
/// stream); a client that trickles its request body is cut off here.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Most streams a client may reset before they are accepted (rapid-reset
/// floods); hyper's default is 20.
const MAX_PENDING_RESETS: usize = 20;

/// How long shutdown waits for connections that are still open once every
/// stream has ended.
pub const CONNECTION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds a Unix socket at `path` with the given mode, creating its parent
/// directory (mode `dir_mode`) if needed. A stale socket left by a crashed
/// daemon is replaced; a live one is not.
///
/// # Errors
/// [`Error::InUse`] when a daemon answers on the path; [`Error::Io`] otherwise.
pub async fn bind(path: &Path, mode: u32, dir_mode: u32) -> Result<UnixListener, Error> {
    let io_err = |action, e| Error::Io {
        action,
        path: path.to_owned(),
        source: Arc::new(e),
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(|e| io_err("create the directory of", e))?;
        // The umask may have taken rights away; agents of every user need
        // to reach the socket.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(|e| io_err("set permissions on the directory of", e))?;
    }
    if let Some(dir) = path.parent() {
        check_directory(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|e| io_err("remove the stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io_err("bind", e))?;
    // Before anyone can connect through the file's permissions: sockets
    // accepted later inherit SO_PASSCRED from the listener when they connect.
    crate::attest::socket::pass_credentials(&listener)
        .map_err(|e| io_err("enable SO_PASSCRED on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("set permissions on", e))?;
    Ok(listener)
}

/// Refuses a socket directory that another user owns or may write to
/// (without the sticky bit): they could swap our socket for theirs and hand
/// agents their own identities.
fn check_directory(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| Error::Io {
        action: "inspect",
        path: dir.to_owned(),
        source: Arc::new(e),
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let unsafe_because = if meta.uid() != me && meta.uid() != 0 {
        Some(format!(
            "owned by uid {}, not by uid {me} or root",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        Some(format!(
            "writable by other users (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match unsafe_because {
        Some(reason) => Err(Error::UnsafeDirectory {
            path: dir.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Serves the Workload API on `listener` until `shutdown` is cancelled, then
/// ends every open stream and returns once connections have closed.
///
/// # Errors
/// [`Error::Server`] when the gRPC server itself fails.
pub async fn serve(
    listener: UnixListener,
    identity: IdentityManager,
    limits: ClientLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), Error> {
    let incoming = peer::Incoming::new(listener, limits).map_err(|e| Error::Io {
        action: "enable SO_PASSCRED on",
        path: PathBuf::from("the workload socket"),
        source: Arc::new(e),
    })?;
    let tasks = TasksServer::new(task::TaskService::new(identity.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let tasks =
        tonic::service::interceptor::InterceptedService::new(tasks, header::check_security_header);
    let service = service::WorkloadService::new(
        identity,
        shutdown.clone(),
        tracker,
        limits.max_streams_per_instance,
    );
    let server = SpiffeWorkloadApiServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let server =
        tonic::service::interceptor::InterceptedService::new(server, header::check_security_header);
    let serving = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .timeout(REQUEST_TIMEOUT)
        .layer(track::TrackLayer)
        .add_service(server)
        .add_service(tasks)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::pin!(serving);
    // Streams end when shutdown starts; what can remain are connections that
    // never finish a request (an idle client, junk on the socket). They get a
    // short grace, then the server stops waiting for them.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(CONNECTION_GRACE).await;
    };
    tokio::select! {
        result = &mut serving => result.map_err(|e| Error::Server(e.to_string())),
        () = grace => {
            tracing::warn!("connections still open after the grace period were dropped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_socket_directory_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&open.join("w.sock"), 0o777, 0o755).await.unwrap_err();
        assert!(matches!(err, Error::UnsafeDirectory { .. }), "{err}");
        // The sticky bit (as on /tmp) makes it safe again.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        bind(&open.join("w.sock"), 0o777, 0o755).await.unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_new_one_is_0777() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.sock");
        drop(bind(&path, 0o777, 0o755).await.unwrap());
        let listener = bind(&path, 0o777, 0o755).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o755);
        drop(listener);
    }
}
