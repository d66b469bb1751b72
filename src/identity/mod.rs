//! Identity: which SVIDs each attested instance holds, now and after rotation.
//!
//! Owns the per-instance state (one background task per live process that
//! holds its SVIDs and tasks, and publishes an [`IdentitySet`] on a `watch`
//! channel so every stream of that process sees the same SVIDs), the rotation
//! schedule, re-attestation before each rotation, task lifecycles, and
//! revocation when a task or instance ends. Does not own gRPC: the services
//! only subscribe to what this module publishes and send it commands.
//!
//! Where each rule lives:
//! - `manager.rs`: [`IdentityManager`], the face: attest, join or start,
//!   task and revocation requests (agent and operator paths).
//! - `registry.rs`: create-or-join. One caller starts an instance, the
//!   others of the same process wait and join; its lock is never held
//!   across attestation, signing or store work.
//! - `state.rs`: one instance's SVIDs and tasks. Each change is signed,
//!   then recorded in one store write with its audit rows, then published;
//!   the write that records a new instance's SVIDs refuses an instance the
//!   store says was revoked, so a revocation that lands first always wins.
//! - `instance.rs`: the actor that owns one `Live` state and publishes it
//!   whole on a `watch`; rotation, re-attestation, expiry, exit, retries.
//! - `context.rs`: what they share, and the [`Mint`] seam before the CA.
//! - `audit.rs`: one constructor per audit event; `revoke.rs`: the CRL
//!   publisher; `schedule.rs`: when rotations happen.

mod audit;
mod context;
mod entries;
mod instance;
mod manager;
mod registry;
mod revoke;
pub mod schedule;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::attest::{self, Attestor, Selector};
use crate::ca::{self, Ca, Svid};
use crate::ids::{Echo, InstanceId, SpiffeId, TrustDomain};
use crate::policy::{Entry, TaskRefusal, TemplateError};
use crate::store::{self, EndReason, Store};

pub(crate) use audit::RefusalLimiter;
pub use audit::admin_event;
pub use context::Mint;
pub use entries::{EntryDef, EntryDiff, EntrySource, InstanceReconciled, LoadedEntry, Reconciled};
pub use manager::{IdentityManager, SvidRevoked};

/// The Workload API hint of the default SVID.
pub const INSTANCE_HINT: &str = "instance";

/// Why a caller got no identity, or a task request failed.
/// (`Clone`: a connection's holder-scan verdict is cached and handed to
/// each of its streams.)
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
    /// An entry with this name exists already (in the config file or the
    /// store).
    #[error(
        "an entry named {0:?} exists already: pick another name, or delete the stored one first"
    )]
    EntryExists(String),
    /// No entry with this name.
    #[error("no entry named {0:?}; `sigil entries list` shows them")]
    UnknownEntry(String),
    /// The entry comes from the config file, which the admin API does not
    /// change.
    #[error(
        "entry {0:?} comes from the config file: edit the file, check it with `sigil config check`, then send the daemon SIGHUP"
    )]
    ConfigEntry(String),
    /// No SVID with this serial.
    #[error(
        "no SVID with serial {0}; serials are lower-case hex, as `sigil instances show` prints them"
    )]
    UnknownSvid(String),
    /// The SVID is already revoked or expired: nothing to do.
    #[error("SVID {serial} is already {state}")]
    SvidNotLive {
        /// Its serial.
        serial: String,
        /// "revoked" or "expired".
        state: &'static str,
    },
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
    /// The entries of its instance SVIDs, in the same order.
    pub entries: Vec<Arc<Entry>>,
    /// Its live tasks, by start.
    pub tasks: Vec<TaskInfo>,
}

/// What an instance's subscribers see.
#[derive(Clone, Debug)]
pub enum InstanceState {
    /// Live, with these SVIDs.
    Active(Arc<IdentitySet>),
    /// Ended, and why: streams of a process that lost its identity
    /// ([`EndReason::Revoked`], [`EndReason::NoLongerMatches`]) end with a
    /// refusal, the others simply end.
    Ended(EndReason),
}

impl InstanceState {
    /// Whether streams should be told the process lost its identity (rather
    /// than just ending, as when the process exits).
    pub fn lost_identity(&self) -> Option<&EndReason> {
        match self {
            InstanceState::Ended(
                reason @ (EndReason::Revoked { .. } | EndReason::NoLongerMatches { .. }),
            ) => Some(reason),
            _ => None,
        }
    }
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

/// What the manager is built from.
pub struct Parts {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Attestation.
    pub attestor: Attestor,
    /// Registration entries of the config file.
    pub entries: Vec<Entry>,
    /// Entries created over the admin API (read back from the store and
    /// validated by the caller).
    pub stored_entries: Vec<LoadedEntry>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The durable store.
    pub store: Arc<Store>,
    /// SVID lifetimes.
    pub settings: SvidSettings,
    /// Send the trust bundle to callers that match no entry (verifiers).
    pub open_bundle: bool,
}

impl Parts {
    /// The parts a daemon with `config` is built from.
    pub fn from_config(
        config: &crate::config::Config,
        attestor: Attestor,
        ca: Arc<Ca>,
        store: Arc<Store>,
    ) -> Self {
        Self {
            trust_domain: config.trust_domain.clone(),
            attestor,
            entries: config.entries.clone(),
            stored_entries: Vec::new(),
            ca,
            store,
            settings: SvidSettings {
                instance_ttl: config.instance_ttl,
                task_ttl: config.task_ttl,
            },
            open_bundle: config.allow_unauthenticated_verifiers,
        }
    }
}
