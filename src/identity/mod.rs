//! Identity: which SVIDs each attested instance holds, now and after rotation.
//!
//! Owns the per-instance state (one [`IdentitySet`] per live process,
//! published on a `watch` channel so every stream of that process sees the
//! same SVIDs), the rotation schedule, re-attestation before each rotation,
//! and dropping an instance when its process exits. Does not own gRPC: the
//! Workload API service only subscribes to what this module publishes.

mod instance;
pub mod schedule;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attest::{self, Attestation, Attestor, PeerCred, Selector};
use crate::ca::{self, Ca, Svid, SvidRequest};
use crate::ids::{InstanceId, TrustDomain};
use crate::policy::{Entry, EntrySet, TemplateError};

/// The Workload API hint of the default SVID.
pub const INSTANCE_HINT: &str = "instance";

/// Why a caller got no identity.
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
    /// One SVID per matching entry; the first is the default SVID.
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

/// What verifiers trust: the trust domain's CA certificates and its CRLs.
/// Built once per change and shared by every stream (`Bytes` clones are
/// reference counts, not copies).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Concatenated DER of the CA certificates.
    pub x509_der: bytes::Bytes,
    /// DER CRLs (none until revocation exists).
    pub crls: Vec<bytes::Bytes>,
}

/// SVID settings from the config.
#[derive(Clone, Copy, Debug)]
pub struct SvidSettings {
    /// Lifetime of an instance SVID when the entry sets none.
    pub instance_ttl: Duration,
}

/// One live instance, as the manager tracks it.
struct InstanceHandle {
    state: watch::Receiver<InstanceState>,
    pid: u32,
    start_time: u64,
}

/// Everything an instance's background task needs, shared.
pub(crate) struct Shared {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) attestor: Attestor,
    pub(crate) entries: EntrySet,
    pub(crate) ca: Arc<Ca>,
    pub(crate) settings: SvidSettings,
    instances: Mutex<HashMap<InstanceId, InstanceHandle>>,
}

/// The identity manager: attests callers and hands out their instance's state.
#[derive(Clone)]
pub struct IdentityManager {
    shared: Arc<Shared>,
    bundle: Arc<watch::Sender<Arc<TrustBundle>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// A summary of one live instance, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSummary {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its process.
    pub pid: u32,
}

impl IdentityManager {
    /// Builds the manager. Instance tasks are spawned on `tracker` and stop
    /// when `shutdown` is cancelled.
    pub fn new(
        trust_domain: TrustDomain,
        attestor: Attestor,
        entries: EntrySet,
        ca: Arc<Ca>,
        settings: SvidSettings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let bundle = TrustBundle {
            trust_domain: trust_domain.clone(),
            x509_der: ca.bundle_der().into(),
            crls: Vec::new(),
        };
        let shared = Arc::new(Shared {
            trust_domain,
            attestor,
            entries,
            ca,
            settings,
            instances: Mutex::new(HashMap::new()),
        });
        Self {
            shared,
            bundle: Arc::new(watch::Sender::new(Arc::new(bundle))),
            shutdown,
            tracker,
        }
    }

    /// Attests the caller and returns its instance's state channel, creating
    /// the instance (and minting its SVIDs) on its first request. Every
    /// stream of one process gets the same channel, so the same SVIDs.
    ///
    /// # Errors
    /// [`Error::Attest`] or [`Error::NoMatchingEntry`] when the caller gets no
    /// identity; [`Error::Ca`]/[`Error::Template`] when minting fails.
    #[tracing::instrument(skip_all, fields(pid = peer.pid, uid = peer.uid))]
    pub async fn subscribe(&self, peer: PeerCred) -> Result<watch::Receiver<InstanceState>, Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let shared = self.shared.clone();
        let attestation = tokio::task::spawn_blocking(move || shared.attestor.attest(&peer))
            .await
            .map_err(|_| Error::ShuttingDown)??;
        if let Some(rx) = self.live_instance(&attestation) {
            return Ok(rx);
        }
        let entries = self.shared.matching(&attestation)?;
        let set = self.shared.mint(&attestation, &entries)?;
        Ok(self.insert_instance(attestation, set))
    }

    /// The trust bundle channel: the current bundle, and every change to it.
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
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

    fn live_instance(&self, attestation: &Attestation) -> Option<watch::Receiver<InstanceState>> {
        let instances = self.shared.lock_instances();
        let handle = instances.get(&attestation.instance_id)?;
        let rx = handle.state.clone();
        let active = matches!(*rx.borrow(), InstanceState::Active(_));
        active.then_some(rx)
    }

    fn insert_instance(
        &self,
        attestation: Attestation,
        set: IdentitySet,
    ) -> watch::Receiver<InstanceState> {
        let mut instances = self.shared.lock_instances();
        // Another request of the same process may have won the race while we
        // were minting: keep its SVIDs, so every stream sees the same ones.
        if let Some(existing) = instances.get(&attestation.instance_id)
            && matches!(*existing.state.borrow(), InstanceState::Active(_))
        {
            return existing.state.clone();
        }
        let (tx, rx) = watch::channel(InstanceState::Active(Arc::new(set)));
        let id = attestation.instance_id.clone();
        let pid = attestation.facts.pid;
        let start_time = attestation.facts.start_time;
        instances.insert(
            id.clone(),
            InstanceHandle {
                state: rx.clone(),
                pid,
                start_time,
            },
        );
        tracing::info!(instance = %id, pid, selectors = %join(&attestation.selectors), "attested a new instance");
        let task = instance::InstanceTask::new(self.shared.clone(), id, pid, start_time, tx);
        self.tracker.spawn(task.run(self.shutdown.clone()));
        rx
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

    /// Mints one SVID per entry for the process.
    pub(crate) fn mint(
        &self,
        attestation: &Attestation,
        entries: &[Arc<Entry>],
    ) -> Result<IdentitySet, Error> {
        let mut svids = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let spiffe_id = entry
                .spiffe_id_for(&self.trust_domain, attestation)
                .map_err(|source| Error::Template {
                    entry: entry.name.clone(),
                    source,
                })?;
            let hint = if i == 0 {
                INSTANCE_HINT.to_owned()
            } else {
                format!("entry:{}", entry.name)
            };
            let svid = self.ca.sign_svid(&SvidRequest {
                spiffe_id,
                dns_names: entry.dns_names.clone(),
                ttl: entry.ttl.unwrap_or(self.settings.instance_ttl),
                hint,
            })?;
            tracing::info!(
                instance = %attestation.instance_id,
                spiffe_id = %svid.spiffe_id,
                serial = %svid.serial,
                "issued an X509-SVID"
            );
            svids.push(svid);
        }
        Ok(IdentitySet {
            instance_id: attestation.instance_id.clone(),
            pid: attestation.facts.pid,
            svids,
        })
    }
}

fn join(selectors: &BTreeSet<Selector>) -> String {
    selectors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
