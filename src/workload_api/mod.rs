//! The Workload API server on its Unix socket.
//!
//! Owns the tonic server on the socket; binding the socket safely is
//! `fsutil::bind_socket`. The service itself is a thin adapter (`service`); the
//! HTTP/2 `:authority` repair that gRPC C-core clients such as py-spiffe
//! need lives in `authority`.

pub mod authority;
pub mod convert;
pub mod header;
pub mod peer;
pub mod service;
pub mod task;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// How long shutdown waits for connections that are still open once every
/// stream has ended.
pub const CONNECTION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the Workload API on `listener` until `shutdown` is cancelled, then
/// ends every open stream and returns once connections have closed.
///
/// # Errors
/// [`Error::Server`] when the gRPC server itself fails.
pub async fn serve(
    listener: UnixListener,
    identity: IdentityManager,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), Error> {
    let tasks = TasksServer::with_interceptor(
        task::TaskService::new(identity.clone()),
        header::check_security_header,
    );
    let service = service::WorkloadService::new(identity, shutdown.clone(), tracker);
    let server = SpiffeWorkloadApiServer::with_interceptor(service, header::check_security_header);
    let serving = tonic::transport::Server::builder()
        .add_service(server)
        .add_service(tasks)
        .serve_with_incoming_shutdown(
            peer::Incoming::new(listener),
            shutdown.clone().cancelled_owned(),
        );
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
