//! Audit events for what the identity manager does: one place that turns
//! attestations, issuances, task changes and revocations into store rows.
//!
//! Issuance and task rows are written in the same transaction as the records
//! they describe (see `state`); the helpers here cover events that stand
//! alone. An audit row that cannot be written is logged, never silently lost.

use std::time::SystemTime;

use serde_json::json;

use super::Shared;
use crate::attest::{Attestation, PeerCred};
use crate::store::{AuditEvent, AuditKind};

/// How a workload caller is named in the audit log.
pub(crate) fn peer_actor(peer: &PeerCred) -> String {
    format!("pid:{} uid:{}", peer.pid, peer.uid)
}

/// The attested selectors, as audit detail.
pub(crate) fn selectors_json(attestation: &Attestation) -> serde_json::Value {
    json!(
        attestation
            .selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    )
}

/// A blank event of `kind` by `actor`, now.
pub(crate) fn event(kind: AuditKind, actor: &str) -> AuditEvent {
    AuditEvent {
        seq: 0,
        at: SystemTime::now(),
        kind,
        actor: actor.to_owned(),
        instance_id: None,
        task_id: None,
        spiffe_id: None,
        serial: None,
        detail: serde_json::Value::Null,
    }
}

impl Shared {
    /// Appends an event on its own; a failure is logged at warn.
    pub(crate) fn audit(&self, event: &AuditEvent) {
        if let Err(e) = super::blocking(|| self.store.append_audit(event)) {
            tracing::warn!(error = %e, kind = %event.kind, "cannot write an audit event");
        }
    }

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
        let mut ev = event(AuditKind::Refusal, &peer_actor(peer));
        ev.instance_id = attestation.map(|a| a.instance_id.to_string());
        ev.detail = json!({
            "reason": reason,
            "selectors": attestation.map(selectors_json),
        });
        self.audit(&ev);
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
