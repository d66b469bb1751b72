//! Audit events for what the identity manager does: one place that turns
//! attestations, issuances, task changes and revocations into store rows.
//!
//! Every event is built by one constructor in [`events`], with a typed
//! detail. Issuance and task rows are written in the same transaction as
//! the records they describe (see `state`); refusals stand alone. An audit row that cannot be written is logged, never silently lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::context::Context;
use crate::attest::{Attestation, PeerCred};
use crate::policy::Entry;
use crate::store::{AuditEvent, AuditKind, EndReason, SvidRecord, TaskEndReason, TaskRecord};

/// How a workload caller is named in the audit log.
pub(crate) fn peer_actor(peer: &PeerCred) -> String {
    format!("pid:{} uid:{}", peer.pid, peer.uid)
}

/// The attested selectors, as text.
pub(crate) fn selector_strings(attestation: &Attestation) -> Vec<String> {
    attestation
        .selectors
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// An event of `kind` by `actor`, now, with `detail` (a typed struct of
/// this module, serialized).
fn event(kind: AuditKind, actor: &str, detail: &impl Serialize) -> AuditEvent {
    AuditEvent {
        seq: 0,
        at: SystemTime::now(),
        kind,
        actor: actor.to_owned(),
        instance_id: None,
        task_id: None,
        spiffe_id: None,
        serial: None,
        detail: serde_json::to_value(detail).unwrap_or(serde_json::Value::Null),
        hash: None,
    }
}

/// An admin action by `actor` (`admin uid:.. pid:..`, or the daemon on a
/// reload), with a typed detail of the caller's.
pub fn admin_event(actor: &str, detail: &impl Serialize) -> AuditEvent {
    event(AuditKind::Admin, actor, detail)
}

/// The one constructor of each audit event the daemon writes. Each names
/// the identity it is about in the event's columns and keeps the rest in a
/// typed detail.
pub(crate) mod events {
    use super::*;

    #[derive(Serialize)]
    struct AttestationDetail<'a> {
        selectors: Vec<String>,
        entries: Vec<&'a str>,
        /// The accountable owner of each entry that names one.
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        owners: BTreeMap<&'a str, &'a str>,
    }

    /// A process was attested and matched `entries`.
    pub(crate) fn attestation(attestation: &Attestation, entries: &[Arc<Entry>]) -> AuditEvent {
        let facts = &attestation.facts;
        let detail = AttestationDetail {
            selectors: selector_strings(attestation),
            entries: entries.iter().map(|e| e.name.as_str()).collect(),
            owners: entries
                .iter()
                .filter_map(|e| Some((e.name.as_str(), e.owner.as_deref()?)))
                .collect(),
        };
        let mut ev = event(
            AuditKind::Attestation,
            &format!("pid:{} uid:{}", facts.pid, facts.uid),
            &detail,
        );
        ev.instance_id = Some(attestation.instance_id.to_string());
        ev
    }

    #[derive(Serialize)]
    struct RefusalDetail<'a> {
        reason: &'a str,
        selectors: Option<Vec<String>>,
    }

    /// A caller was refused an identity.
    pub(crate) fn refusal(
        peer: &PeerCred,
        reason: &str,
        attestation: Option<&Attestation>,
    ) -> AuditEvent {
        let detail = RefusalDetail {
            reason,
            selectors: attestation.map(selector_strings),
        };
        let mut ev = event(AuditKind::Refusal, &peer_actor(peer), &detail);
        ev.instance_id = attestation.map(|a| a.instance_id.to_string());
        ev
    }

    /// Whether an SVID is the first of its identity or replaces one.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Minted {
        /// The first SVID of an instance or task (or after a restart).
        First,
        /// A rotation.
        Rotation,
    }

    #[derive(Serialize)]
    struct IssuanceDetail<'a> {
        hint: &'a str,
        ttl_secs: u64,
    }

    /// An SVID was minted and recorded.
    pub(crate) fn issuance(
        minted: Minted,
        record: &SvidRecord,
        hint: &str,
        ttl: Duration,
    ) -> AuditEvent {
        let kind = match minted {
            Minted::First => AuditKind::Issuance,
            Minted::Rotation => AuditKind::Rotation,
        };
        let detail = IssuanceDetail {
            hint,
            ttl_secs: ttl.as_secs(),
        };
        let mut ev = event(kind, "daemon", &detail);
        ev.instance_id = Some(record.instance_id.clone());
        ev.task_id = record.task_id.clone();
        ev.spiffe_id = Some(record.spiffe_id.clone());
        ev.serial = Some(record.serial.clone());
        ev
    }

    #[derive(Serialize)]
    struct TaskBeginDetail<'a> {
        ttl_secs: u64,
        attributes: &'a BTreeMap<String, String>,
    }

    /// A task started.
    pub(crate) fn task_begin(record: &TaskRecord, ttl: Duration) -> AuditEvent {
        let detail = TaskBeginDetail {
            ttl_secs: ttl.as_secs(),
            attributes: &record.attributes,
        };
        let mut ev = event(AuditKind::TaskBegin, &record.started_by, &detail);
        ev.instance_id = Some(record.instance_id.clone());
        ev.task_id = Some(record.task_id.clone());
        ev.spiffe_id = Some(record.spiffe_id.clone());
        ev
    }

    #[derive(Serialize)]
    struct ReasonDetail {
        reason: String,
    }

    /// A task ended.
    pub(crate) fn task_end(
        instance_id: &str,
        task_id: &str,
        reason: &TaskEndReason,
        actor: &str,
    ) -> AuditEvent {
        let detail = ReasonDetail {
            reason: reason.to_string(),
        };
        let mut ev = event(AuditKind::TaskEnd, actor, &detail);
        ev.instance_id = Some(instance_id.to_owned());
        ev.task_id = Some(task_id.to_owned());
        ev
    }

    #[derive(Serialize)]
    struct RevocationDetail<'a> {
        serials: &'a [String],
        reason: &'a str,
    }

    /// SVIDs were revoked (of a task, or superseded ones of an instance).
    pub(crate) fn revocation(
        instance_id: &str,
        task_id: Option<&str>,
        serials: &[String],
        reason: &str,
        actor: &str,
    ) -> AuditEvent {
        let detail = RevocationDetail { serials, reason };
        let mut ev = event(AuditKind::Revocation, actor, &detail);
        ev.instance_id = Some(instance_id.to_owned());
        ev.task_id = task_id.map(str::to_owned);
        ev
    }

    #[derive(Serialize)]
    struct InstanceEndDetail<'a> {
        reason: String,
        kind: &'a str,
        revoked_serials: &'a [String],
    }

    /// An instance ended; `serials` are the SVIDs its end revoked.
    pub(crate) fn instance_end(
        instance_id: &str,
        reason: &EndReason,
        serials: &[String],
        actor: &str,
    ) -> AuditEvent {
        let detail = InstanceEndDetail {
            reason: reason.to_string(),
            kind: reason.kind(),
            revoked_serials: serials,
        };
        let mut ev = event(AuditKind::InstanceEnd, actor, &detail);
        ev.instance_id = Some(instance_id.to_owned());
        ev
    }
}

impl Context {
    /// Records a refused caller, at most once per [`REFUSAL_AUDIT_INTERVAL`]
    /// per pid: the socket is open to every local user, and a client that
    /// retries forever must not be able to fill the append-only log.
    pub(crate) fn audit_refusal(
        &self,
        peer: &PeerCred,
        reason: &str,
        attestation: Option<&Attestation>,
    ) {
        if !self.refusals.should_audit(peer.pid) {
            tracing::debug!(pid = peer.pid, %reason, "refused (audit rate-limited)");
            return;
        }
        let ev = events::refusal(peer, reason, attestation);
        // Not awaited: a refusal is answered at once; the writer records it
        // with the next group. A failure is logged, never silent.
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.write_async(move |tx| tx.append_audit(&ev)).await {
                tracing::warn!(error = %e, "cannot write an audit event");
            }
        });
    }
}

/// Least time between two audited refusals of the same pid.
pub(crate) const REFUSAL_AUDIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Most pids remembered by the limiter before it starts afresh.
const MAX_TRACKED_PIDS: usize = 4096;

/// Remembers when each pid's refusal was last audited.
#[derive(Default)]
pub(crate) struct RefusalLimiter {
    last: std::sync::Mutex<std::collections::HashMap<u32, std::time::Instant>>,
}

impl RefusalLimiter {
    /// True when `pid`'s refusal should be written now.
    pub(crate) fn should_audit(&self, pid: u32) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last
            .get(&pid)
            .is_some_and(|t| now.duration_since(*t) < REFUSAL_AUDIT_INTERVAL)
        {
            return false;
        }
        if last.len() >= MAX_TRACKED_PIDS {
            last.clear();
        }
        last.insert(pid, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_refused_again_within_the_interval_is_not_audited_twice() {
        let limiter = RefusalLimiter::default();
        assert!(limiter.should_audit(7));
        assert!(!limiter.should_audit(7));
        assert!(limiter.should_audit(8));
    }
}
