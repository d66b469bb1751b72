//! Identity: which SVIDs each attested instance holds, now and after rotation.
//!
//! Owns the per-instance state (one background task per live process that
//! holds its SVIDs and tasks, and publishes an [`IdentitySet`] on a `watch`
//! channel so every stream of that process sees the same SVIDs), the rotation
//! schedule, re-attestation before each rotation, task lifecycles, and
//! revocation when a task or instance ends. Does not own gRPC: the services
//! only subscribe to what this module publishes and send it commands.

mod audit;
mod instance;
mod operations;
mod revoke;
pub mod schedule;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attest::{self, Attestation, Attestor, PeerCred, Selector};
use crate::ca::{self, Ca, Svid};
use crate::ids::{Echo, InstanceId, SpiffeId, TrustDomain};
use crate::policy::{Entry, EntrySet, TaskRefusal, TemplateError};
use crate::store::{self, Store};
use instance::Command;

/// How the store's end reason of an explicitly revoked instance begins.
pub(crate) const REVOKED_PREFIX: &str = "revoked";

/// The Workload API hint of the default SVID.
pub const INSTANCE_HINT: &str = "instance";

/// Why a caller got no identity, or a task request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Attestation refused the caller.
    #[error(transparent)]
    Attest(#[from] attest::Error),
    /// The caller matches no entry.
    #[error("process {pid} matches no registration entry")]
    NoMatchingEntry {
        /// The caller's pid.
        pid: u32,
        /// What it was attested as, for the log.
        selectors: BTreeSet<Selector>,
    },
    /// An entry's template gave an invalid SPIFFE ID for this process.
    #[error("entry {entry}: {source}")]
    Template {
        /// The entry.
        entry: String,
        /// What is wrong with the ID.
        source: TemplateError,
    },
    /// The CA could not sign.
    #[error(transparent)]
    Ca(#[from] ca::Error),
    /// The store could not record what happened, so it did not happen.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The task request was refused by policy or is malformed.
    #[error(transparent)]
    Task(#[from] TaskRefusal),
    /// No live task with this id for this instance.
    #[error("no live task {0} for this instance")]
    UnknownTask(Echo),
    /// No live instance with this id.
    #[error("no live instance {0}")]
    UnknownInstance(String),
    /// This very process (same pid, start time and boot) had its identity
    /// revoked; it stays revoked for as long as it runs.
    #[error("this process's identity was revoked ({0})")]
    Revoked(String),
    /// The instance ended while the request was in flight.
    #[error("the instance ended")]
    InstanceEnded,
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// The SVIDs of one instance at one moment: every message a stream sends is
/// built from one of these, whole (clients replace their state per message).
#[derive(Debug)]
pub struct IdentitySet {
    /// Which instance.
    pub instance_id: InstanceId,
    /// The process.
    pub pid: u32,
    /// One SVID per matching entry (the first is the default SVID), then
    /// one per live task.
    pub svids: Vec<Svid>,
}

/// What an instance's subscribers see.
#[derive(Clone, Debug)]
pub enum InstanceState {
    /// Live, with these SVIDs.
    Active(Arc<IdentitySet>),
    /// No longer entitled to an identity (e.g. exec'd another binary).
    Revoked(String),
    /// The process exited.
    Exited,
}

/// What verifiers trust: the trust domain's CA certificates and its CRL.
/// Built once per change and shared by every stream (`Bytes` clones are
/// reference counts, not copies).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Concatenated DER of the CA certificates.
    pub x509_der: bytes::Bytes,
    /// DER CRLs signed by the CA (one, once the publisher has run).
    pub crls: Vec<bytes::Bytes>,
}

/// SVID settings from the config.
#[derive(Clone, Copy, Debug)]
pub struct SvidSettings {
    /// Lifetime of an instance SVID when the entry sets none.
    pub instance_ttl: Duration,
    /// Longest lifetime of a task SVID (a task's SVID never outlives the task).
    pub task_ttl: Duration,
}

/// A task request.
#[derive(Clone, Debug, Default)]
pub struct BeginTask {
    /// The id; generated when `None` or empty.
    pub task_id: Option<String>,
    /// The task's lifetime; `svid.task_ttl` when `None`.
    pub ttl: Option<Duration>,
    /// Free-form attributes, kept in the store and audit log.
    pub attributes: BTreeMap<String, String>,
}

/// A live task, as callers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// The task id.
    pub task_id: String,
    /// The SPIFFE ID of its SVIDs.
    pub spiffe_id: SpiffeId,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ends on its own.
    pub expires_at: SystemTime,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A summary of one live instance, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSummary {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its process.
    pub pid: u32,
}

/// One live instance, as the manager tracks it.
struct InstanceHandle {
    state: watch::Receiver<InstanceState>,
    commands: mpsc::Sender<Command>,
    pid: u32,
    start_time: u64,
}

/// Everything the instance tasks share.
pub(crate) struct Shared {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) attestor: Attestor,
    pub(crate) entries: EntrySet,
    pub(crate) ca: Arc<Ca>,
    pub(crate) store: Arc<Store>,
    pub(crate) settings: SvidSettings,
    pub(crate) crl: revoke::CrlTrigger,
    refusals: audit::RefusalLimiter,
    instances: Mutex<HashMap<InstanceId, InstanceHandle>>,
    /// Begin allowances per entry and uid, shared by all that uid's
    /// processes under the entry: a process that exits and is started
    /// again does not get a fresh burst.
    pub(crate) begins: Mutex<HashMap<(String, u32), crate::policy::TokenBucket>>,
}

/// The identity manager: attests callers, hands out their instance's state,
/// and runs their tasks.
#[derive(Clone)]
pub struct IdentityManager {
    shared: Arc<Shared>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// What the manager is built from.
pub struct Parts {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Attestation.
    pub attestor: Attestor,
    /// Registration entries.
    pub entries: EntrySet,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The durable store.
    pub store: Arc<Store>,
    /// SVID lifetimes.
    pub settings: SvidSettings,
}

impl IdentityManager {
    /// Builds the manager and starts the CRL publisher. Instance tasks are
    /// spawned on `tracker` and stop when `shutdown` is cancelled.
    pub fn new(parts: Parts, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        let bundle = TrustBundle {
            trust_domain: parts.trust_domain.clone(),
            x509_der: parts.ca.bundle_der().into(),
            crls: Vec::new(),
        };
        let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
        let crl = revoke::spawn_publisher(
            parts.store.clone(),
            parts.ca.clone(),
            bundle_tx,
            shutdown.clone(),
            &tracker,
        );
        let shared = Arc::new(Shared {
            trust_domain: parts.trust_domain,
            attestor: parts.attestor,
            entries: parts.entries,
            ca: parts.ca,
            store: parts.store,
            settings: parts.settings,
            crl,
            refusals: audit::RefusalLimiter::default(),
            instances: Mutex::new(HashMap::new()),
            begins: Mutex::new(HashMap::new()),
        });
        Self {
            shared,
            bundle: bundle_rx,
            shutdown,
            tracker,
        }
    }

    /// Picks up where a previous run left off: instances whose process still
    /// runs get their identity and unexpired tasks back; the others end, and
    /// their SVIDs are revoked. Blocking (it attests); call at start-up.
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be read.
    pub async fn restore(&self) -> Result<(), Error> {
        for record in self.shared.store.live_instances()? {
            let shared = self.shared.clone();
            let (pid, start) = (record.pid, record.start_time);
            let same_boot = record.boot_id == self.shared.attestor.boot_id();
            let reattested =
                tokio::task::spawn_blocking(move || shared.attestor.reattest(pid, start))
                    .await
                    .map_err(|_| Error::ShuttingDown)?;
            let outcome = match reattested {
                Ok(a) if same_boot && a.instance_id.as_str() == record.instance_id => {
                    match self.shared.matching(&a) {
                        Ok(entries) => self.start_instance(a, entries).map(drop),
                        Err(_) => {
                            self.end_stored(&record.instance_id, "no longer matches its entries")
                        }
                    }
                }
                // Not readable right now (e.g. out of file descriptors): leave
                // it; it is restored on its next request.
                Err(e @ attest::Error::ProcRead { .. }) if same_boot => Err(e.into()),
                _ => self.end_stored(&record.instance_id, "process gone across a restart"),
            };
            // One instance that cannot be restored must not keep the daemon
            // from serving everyone else; it gets a fresh start on request.
            if let Err(e) = outcome {
                tracing::warn!(instance = %record.instance_id, error = %e, "cannot restore an instance");
            }
        }
        Ok(())
    }

    fn end_stored(&self, instance_id: &str, reason: &str) -> Result<(), Error> {
        blocking(|| self.shared.end_stored_instance(instance_id, reason))
    }

    /// Attests the caller and returns its instance's state channel, creating
    /// the instance (and minting its SVIDs) on its first request. Every
    /// stream of one process gets the same channel, so the same SVIDs.
    ///
    /// # Errors
    /// [`Error::Attest`] or [`Error::NoMatchingEntry`] when the caller gets no
    /// identity; [`Error::Ca`], [`Error::Template`], [`Error::Store`] when
    /// issuing fails.
    #[tracing::instrument(skip_all, fields(pid = peer.pid, uid = peer.uid))]
    pub async fn subscribe(&self, peer: PeerCred) -> Result<watch::Receiver<InstanceState>, Error> {
        Ok(self.instance_for(peer).await?.0)
    }

    /// Runs `check`, one of `attest::socket`'s checks of `peer`'s
    /// connection made before a message with private keys is written, off
    /// the async workers; a refusal is audited like any other.
    ///
    /// # Errors
    /// [`Error::Attest`] with the check's reason.
    pub async fn check_connection<F>(&self, peer: PeerCred, check: F) -> Result<(), Error>
    where
        F: FnOnce() -> Result<(), attest::Error> + Send + 'static,
    {
        let checked = tokio::task::spawn_blocking(check)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        checked.map_err(|e| {
            self.shared.audit_refusal(&peer, &e.to_string(), None);
            e.into()
        })
    }

    /// The trust bundle channel: the current bundle and CRL, and every change.
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.clone()
    }

    /// The instances currently tracked.
    pub fn instances(&self) -> Vec<InstanceSummary> {
        let mut list: Vec<_> = self
            .shared
            .lock_instances()
            .iter()
            .map(|(id, h)| InstanceSummary {
                instance_id: id.clone(),
                pid: h.pid,
            })
            .collect();
        list.sort_by_key(|s| s.pid);
        list
    }

    fn commands_of(&self, instance: &InstanceId) -> Result<mpsc::Sender<Command>, Error> {
        self.shared
            .lock_instances()
            .get(instance)
            .map(|h| h.commands.clone())
            .ok_or_else(|| Error::UnknownInstance(instance.to_string()))
    }

    /// Attests `peer` and returns its live instance, creating it if needed.
    async fn instance_for(
        &self,
        peer: PeerCred,
    ) -> Result<(watch::Receiver<InstanceState>, mpsc::Sender<Command>), Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let shared = self.shared.clone();
        let attested = tokio::task::spawn_blocking(move || shared.attestor.attest(&peer))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let attestation = match attested {
            Ok(a) => a,
            Err(e) => {
                self.shared.audit_refusal(&peer, &e.to_string(), None);
                return Err(e.into());
            }
        };
        // Match first, even for a live instance: a process that exec'd
        // another binary or changed uid is refused now, not at its next
        // rotation, and its instance is told to re-attest at once.
        let entries = match self.shared.matching(&attestation) {
            Ok(entries) => entries,
            Err(e) => {
                self.recheck(&attestation.instance_id);
                self.shared
                    .audit_refusal(&peer, &e.to_string(), Some(&attestation));
                return Err(e);
            }
        };
        if let Some(live) = self.live_instance(&attestation) {
            return Ok(live);
        }
        self.recheck_earlier_programs(&attestation);
        if let Some(reason) = blocking(|| self.shared.revocation_of(&attestation.instance_id))? {
            self.shared.audit_refusal(
                &peer,
                &format!("revoked instance: {reason}"),
                Some(&attestation),
            );
            return Err(Error::Revoked(reason));
        }
        self.start_instance(attestation, entries)
    }

    /// A live instance of the same pid under another id is the program this
    /// process ran before an exec: it is told to re-attest now, and so ends
    /// (its SVIDs revoked) at once rather than at its next rotation.
    fn recheck_earlier_programs(&self, attestation: &Attestation) {
        let instances = self.shared.lock_instances();
        for (id, handle) in instances.iter() {
            if handle.pid == attestation.facts.pid && *id != attestation.instance_id {
                let _ = handle.commands.try_send(Command::Recheck);
            }
        }
    }

    /// Asks a live instance to re-attest now (it ends itself if the process
    /// no longer qualifies).
    fn recheck(&self, instance: &InstanceId) {
        if let Ok(commands) = self.commands_of(instance) {
            let _ = commands.try_send(Command::Recheck);
        }
    }

    fn live_instance(
        &self,
        attestation: &Attestation,
    ) -> Option<(watch::Receiver<InstanceState>, mpsc::Sender<Command>)> {
        let instances = self.shared.lock_instances();
        let handle = instances.get(&attestation.instance_id)?;
        let active = matches!(*handle.state.borrow(), InstanceState::Active(_));
        active.then(|| (handle.state.clone(), handle.commands.clone()))
    }

    fn start_instance(
        &self,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
    ) -> Result<(watch::Receiver<InstanceState>, mpsc::Sender<Command>), Error> {
        if let Some(live) = self.live_instance(&attestation) {
            return Ok(live);
        }
        // Mint and record outside the map's lock: that is disk and signing
        // work, and other callers must not wait on it.
        let live = blocking(|| state::Live::start(&self.shared, attestation, entries))?;
        let id = live.attestation.instance_id.clone();
        let mut instances = self.shared.lock_instances();
        // Revoked while we were minting? Then it stays revoked.
        if let Some(reason) = blocking(|| self.shared.revocation_of(&id))? {
            return Err(Error::Revoked(reason));
        }
        // Another request of the same process may have won the race: keep its
        // SVIDs, so every stream sees the same ones (ours expire unused). A
        // revocation the store has not recorded yet (a full disk) still holds.
        if let Some(existing) = instances.get(&live.attestation.instance_id) {
            match &*existing.state.borrow() {
                InstanceState::Active(_) => {
                    return Ok((existing.state.clone(), existing.commands.clone()));
                }
                InstanceState::Revoked(reason) => return Err(Error::Revoked(reason.clone())),
                _ => {}
            }
        }
        let id = live.attestation.instance_id.clone();
        let (pid, start_time) = (
            live.attestation.facts.pid,
            live.attestation.facts.start_time,
        );
        let (state_tx, state_rx) = watch::channel(InstanceState::Active(live.identity_set()));
        let (commands_tx, commands_rx) = mpsc::channel(16);
        instances.insert(
            id,
            InstanceHandle {
                state: state_rx.clone(),
                commands: commands_tx.clone(),
                pid,
                start_time,
            },
        );
        let task = instance::InstanceTask::new(self.shared.clone(), live, state_tx, commands_rx);
        self.tracker.spawn(task.run(self.shutdown.clone()));
        Ok((state_rx, commands_tx))
    }
}

/// Runs store and signing work (SQLite commits with fsync, ECDSA) without
/// stalling the runtime: on the multi-thread runtime the daemon uses, the
/// worker hands its other tasks to another thread while this one blocks.
/// On a current-thread runtime (some tests) it simply runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Shared {
    fn lock_instances(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, InstanceHandle>> {
        // The map is only ever inserted into or removed from whole, so a
        // poisoned lock still guards a consistent map.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets an instance, if the map still holds this very process.
    pub(crate) fn remove_instance(&self, id: &InstanceId, start_time: u64) {
        let mut instances = self.lock_instances();
        if instances
            .get(id)
            .is_some_and(|h| h.start_time == start_time)
        {
            instances.remove(id);
        }
    }

    /// Why this very process was revoked, if it was: an explicit revocation
    /// sticks for the life of the process (other endings do not: a process
    /// that stopped matching its entry is refused by matching anyway).
    pub(crate) fn revocation_of(&self, instance: &InstanceId) -> Result<Option<String>, Error> {
        let record = self.store.instance(instance.as_str())?;
        Ok(record.and_then(|r| {
            r.ended_at?;
            r.end_reason
                .filter(|reason| reason.starts_with(REVOKED_PREFIX))
        }))
    }

    /// The entries that admit this attested process.
    pub(crate) fn matching(&self, attestation: &Attestation) -> Result<Vec<Arc<Entry>>, Error> {
        let entries = self.entries.matching(attestation);
        if entries.is_empty() {
            return Err(Error::NoMatchingEntry {
                pid: attestation.facts.pid,
                selectors: attestation.selectors.clone(),
            });
        }
        Ok(entries)
    }
}
