//! The admin API (`sigil.admin.v1.Admin`) on its own Unix socket: what
//! operators and orchestrators use to see, change and revoke every agent
//! identity on the node.
//!
//! Owns the server on the admin socket and who may call it (`access`: the
//! one rule, from the caller's peer credentials; every call, admitted or
//! refused, is audited with the caller's uid and pid). The service
//! (`service`) is a thin adapter over `identity` (instances, tasks,
//! revocation, entries) and `store` (records, the audit trail, its hash
//! chain); protobuf conversions are in `convert`. It binds nothing itself:
//! `app` binds the socket (0600, or 0660 with `[admin_api] group`).

pub mod access;
mod convert;
mod service;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::config::Config;
use crate::identity::IdentityManager;
use crate::proto::sigil::admin::v1::admin_server::AdminServer;
use crate::store::Store;
pub use access::{Access, Caller};

/// Largest request message on the admin socket (an entry with many
/// selectors fits easily).
pub const MAX_REQUEST_BYTES: usize = 256 << 10; // 256 KiB
/// Largest response message (a long listing of instances or audit events).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20; // 64 MiB
/// Most concurrent requests on one admin connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Why the admin socket could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed.
    #[error("the admin API server failed: {0}")]
    Server(String),
}

/// What the admin service reads and changes.
#[derive(Clone)]
pub struct AdminContext {
    /// Instances, tasks, revocation, entries.
    pub identity: IdentityManager,
    /// Records and the audit trail.
    pub store: Arc<Store>,
    /// The CA (its expiry, for status).
    pub ca: Arc<Ca>,
    /// The running config (trust domain, sockets, where it came from).
    pub config: Arc<Config>,
    /// Who may call.
    pub access: Access,
    /// When the daemon started.
    pub started_at: SystemTime,
    /// Stops the audit followers.
    pub shutdown: CancellationToken,
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// [`Error::Server`] when the gRPC server fails.
pub async fn serve(listener: UnixListener, ctx: AdminContext) -> Result<(), Error> {
    let shutdown = ctx.shutdown.clone();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let service = AdminServer::new(service::AdminService::new(ctx))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| Error::Server(e.to_string()))
}
