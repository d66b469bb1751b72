//! The Workload API server on its Unix socket.
//!
//! Owns the tonic server on the socket; binding the socket safely is
//! `fsutil::bind_socket`. The service itself is a thin adapter (`service`); the
//! HTTP/2 `:authority` repair that gRPC C-core clients such as py-spiffe
//! need lives in `authority`; the one mapping from identity errors to gRPC
//! status in `status`.

pub mod authority;
pub mod codec;
pub mod convert;
pub mod header;
pub mod peer;
pub mod service;
pub mod status;
pub mod task;
pub mod track;

use std::io;
use std::path::PathBuf;
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
    /// The socket could not be set up.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
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
        action: "prepare (SO_PASSCRED, sock_diag)",
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
