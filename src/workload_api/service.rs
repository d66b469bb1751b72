//! The SPIFFE Workload API service: a thin adapter over `identity`.
//!
//! A handler reads the caller's credentials from the connection, asks the
//! identity manager for the caller's instance, and streams that instance's
//! state as it changes. The security header is checked by an interceptor
//! (see `header`) before any handler runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::peer::{Connection, caller};
use super::status::{log_refusal, revoked, status};
use crate::attest::PeerCred;
use crate::attest::holders::HolderScans;
use crate::identity::{self, IdentityManager, IdentitySet, InstanceState, TrustBundle};
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use crate::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};

/// The Workload API, as served on the workload socket.
pub struct WorkloadService {
    identity: IdentityManager,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    streams: StreamCounts,
    /// Sole-holder checks, served by shared walks of /proc (one at a time):
    /// a burst of new connections costs a walk or two, not one walk each.
    scans: HolderScans,
}

impl WorkloadService {
    /// Serves identities from `identity`; open streams end on `shutdown`.
    /// `max_streams_per_instance` caps the open streams of one process.
    pub fn new(
        identity: IdentityManager,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        max_streams_per_instance: usize,
    ) -> Self {
        Self {
            identity,
            shutdown,
            tracker,
            streams: StreamCounts::new(max_streams_per_instance),
            scans: HolderScans::default(),
        }
    }

    /// Attests the caller and opens one of its streams: its instance's
    /// state channel and a slot under the per-instance stream cap.
    async fn subscribe<T>(&self, req: &Request<T>) -> Result<Subscription, Status> {
        let (peer, conn) = caller(req).map_err(|e| status(&e.into()))?;
        let state = self.identity.subscribe(peer).await.map_err(|e| {
            log_refusal(&e, peer.pid);
            status(&e)
        })?;
        let slot = self.streams.acquire(&peer)?;
        Ok(Subscription {
            state,
            peer,
            conn: Some(conn),
            slot,
        })
    }

    /// Attests the caller and checks an entry admits it, without starting
    /// an instance; takes a slot under the per-instance stream cap.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<(PeerCred, StreamSlot), Status> {
        let (peer, _) = caller(req).map_err(|e| status(&e.into()))?;
        self.identity.authorize(peer).await.map_err(|e| {
            log_refusal(&e, peer.pid);
            status(&e)
        })?;
        let slot = self.streams.acquire(&peer)?;
        Ok((peer, slot))
    }

    /// Streams messages built by `build` from the instance state and the
    /// CA certificates, once now and again on every change of the state.
    /// When `keys` is set the messages carry private keys, and each is sent
    /// only after the check that the attested process alone holds the
    /// connection.
    fn stream<T: Send + 'static>(
        &self,
        sub: Subscription,
        keys: bool,
        build: fn(&IdentitySet, &Bytes) -> T,
    ) -> BoxStream<T> {
        let (tx, rx) = channel();
        let anchors = self.identity.anchors();
        let shutdown = self.shutdown.clone();
        let holder_check = match (keys, sub.conn) {
            (true, Some(conn)) => Some(HolderCheck {
                identity: self.identity.clone(),
                peer: sub.peer,
                conn,
                scans: self.scans.clone(),
            }),
            _ => None,
        };
        let Subscription { state, slot, .. } = sub;
        self.tracker.spawn(async move {
            drive(state, anchors, tx, build, holder_check, shutdown).await;
            drop(slot);
        });
        rx
    }
}

/// One message of a stream, boxed on its way from `drive` to tonic: tokio's
/// channel allocates room for 32 items whatever its capacity, and 32 unboxed
/// `Result<X509svidResponse, Status>` take 3 KiB for every open stream
/// (heaptrack, BENCHMARKS.md "Memory after load"); 32 boxes take 256 bytes.
type Item<T> = Box<Result<T, Status>>;

/// The channel between a stream's `drive` task and tonic. Room for one
/// message: a client that has not read its last update gets only the newest
/// one when it does.
fn channel<T: Send + 'static>() -> (mpsc::Sender<Item<T>>, BoxStream<T>) {
    let (tx, rx) = mpsc::channel(1);
    (
        tx,
        Box::pin(ReceiverStream::new(rx).map(|item: Item<T>| *item)),
    )
}

/// An attested caller's open stream, before it is driven.
struct Subscription {
    state: watch::Receiver<InstanceState>,
    peer: PeerCred,
    conn: Option<Arc<Connection>>,
    slot: StreamSlot,
}

/// What `drive` checks before a message with private keys goes out.
struct HolderCheck {
    identity: IdentityManager,
    peer: PeerCred,
    conn: Arc<Connection>,
    scans: HolderScans,
}

impl HolderCheck {
    /// Whether a message with private keys may go over this connection:
    /// it was pinned to a program, the process still runs that program
    /// (checked before every such message), and, where needed, it alone
    /// holds the client end. That /proc scan runs once per connection, and
    /// its verdict stands for the connection's life: a connection found
    /// shared stays refused, and one found private can only be shared later
    /// by the attested program's own doing.
    async fn verdict(&self) -> Result<(), identity::Error> {
        use crate::attest::{self, socket};
        let (peer, pid, pinned) = (self.peer, self.peer.pid, self.conn.accepted.pinned);
        self.identity
            .check_connection(peer, move || socket::check_program(pid, pinned))
            .await?;
        let early = self
            .conn
            .early_request
            .load(std::sync::atomic::Ordering::Acquire);
        if pinned.is_some_and(|p| !socket::needs_holder_scan(&p, early)) {
            return Ok(());
        }
        let Some(inode) = self.conn.accepted.client_inode else {
            let no_end = move || Err(attest::Error::NoClientEnd { pid });
            return self.identity.check_connection(peer, no_end).await;
        };
        self.conn
            .sole_holder
            .get_or_init(|| async {
                match self.scans.check(pid, inode).await {
                    Ok(()) => Ok(()),
                    // Through `check_connection` so the refusal is audited.
                    Err(e) => self.identity.check_connection(peer, || Err(e)).await,
                }
            })
            .await
            .clone()
    }
}

/// A process, as the stream cap counts it: pid and pinned start time.
type ProcessKey = (u32, Option<u64>);

/// Open streams per process, to cap them.
#[derive(Clone)]
struct StreamCounts {
    max: usize,
    open: Arc<Mutex<HashMap<ProcessKey, usize>>>,
}

impl StreamCounts {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProcessKey, usize>> {
        // Counters only: a poisoned lock still holds usable numbers.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(&self, peer: &PeerCred) -> Result<StreamSlot, Status> {
        let key = (peer.pid, peer.start_time);
        let mut open = self.lock();
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return Err(Status::resource_exhausted(format!(
                "process {} already has {} open Workload API streams, the most one process may \
                 hold (workload_api.max_streams_per_instance); close some and retry",
                peer.pid, self.max
            )));
        }
        *count += 1;
        Ok(StreamSlot {
            key,
            counts: self.clone(),
            _open: crate::metrics::global().stream_opened(),
        })
    }
}

/// One open stream of a process; given back on drop (and counted in the
/// open streams gauge while it lives).
struct StreamSlot {
    key: ProcessKey,
    counts: StreamCounts,
    _open: crate::metrics::OpenStream,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.counts.lock();
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<BoxStream<X509svidResponse>>, Status> {
        let sub = self.subscribe(&request).await?;
        Ok(Response::new(self.stream(
            sub,
            true,
            convert::x509_svid_response,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<BoxStream<X509BundlesResponse>>, Status> {
        // Attest-only: the bundle is public, and a caller that is entitled
        // to it gets it without an instance or any SVID being minted.
        let (peer, slot) = self.authorize(&request).await?;
        let (tx, rx) = channel();
        let bundle = self.identity.bundle();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            drive_bundle(bundle, tx, shutdown).await;
            drop(slot);
            tracing::trace!(pid = peer.pid, "bundle stream ended");
        });
        Ok(Response::new(rx))
    }
}

/// Feeds one stream until the client leaves, the instance ends or the
/// daemon shuts down. It reserves room in the channel *before* reading the
/// state, so what it sends is always the newest. CRL changes do not wake it
/// (see `convert`): only its own instance's changes do.
async fn drive<T>(
    mut state: watch::Receiver<InstanceState>,
    anchors: Bytes,
    tx: mpsc::Sender<Item<T>>,
    build: fn(&IdentitySet, &Bytes) -> T,
    holder_check: Option<HolderCheck>,
    shutdown: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // the client went away
            },
            () = shutdown.cancelled() => return,
        };
        let current = state.borrow_and_update().clone();
        if let (InstanceState::Active(_), Some(check)) = (&current, &holder_check)
            && let Err(e) = check.verdict().await
        {
            log_refusal(&e, check.peer.pid);
            permit.send(Box::new(Err(status(&e))));
            return;
        }
        if let InstanceState::Active(set) = &current {
            permit.send(Box::new(Ok(build(set, &anchors))));
        } else {
            if let Some(reason) = current.lost_identity() {
                permit.send(Box::new(Err(revoked(&reason.to_string()))));
            }
            return;
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
            () = shutdown.cancelled() => return,
        }
        if !coalesce(&shutdown).await {
            return;
        }
    }
}

/// Changes of one instance can come in bursts (several tasks begun at
/// once): waits a moment so they reach the client as one message. `false`
/// when the daemon is shutting down.
async fn coalesce(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(PUSH_COALESCE) => true,
        () = shutdown.cancelled() => false,
    }
}

/// Feeds a bundle stream: the bundle and CRL now, then every new CRL at
/// once (the CRL publisher has already gathered the changes behind it),
/// until the client leaves or the daemon shuts down. Like [`drive`], it
/// reserves room before reading, so what it sends is always the newest.
async fn drive_bundle(
    mut bundle: watch::Receiver<Arc<TrustBundle>>,
    tx: mpsc::Sender<Item<X509BundlesResponse>>,
    shutdown: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let trust = bundle.borrow_and_update().clone();
        permit.send(Box::new(Ok(convert::x509_bundles_response(&trust))));
        tokio::select! {
            changed = bundle.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
            () = shutdown.cancelled() => return,
        }
    }
}

/// How long an SVID stream gathers its instance's changes before pushing:
/// short against the 200 ms Begin → task SVID budget, and a cap of 50
/// messages a second on a stream whatever the instance does.
const PUSH_COALESCE: std::time::Duration = std::time::Duration::from_millis(20);
