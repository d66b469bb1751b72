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
        if let Err(e) = self.store.append_audit(event) {
            tracing::warn!(error = %e, kind = %event.kind, "cannot write an audit event");
        }
    }

    /// Records a refused caller.
    pub(crate) fn audit_refusal(
        &self,
        peer: &PeerCred,
        reason: &str,
        attestation: Option<&Attestation>,
    ) {
        let mut ev = event(AuditKind::Refusal, &peer_actor(peer));
        ev.instance_id = attestation.map(|a| a.instance_id.to_string());
        ev.detail = json!({
            "reason": reason,
            "selectors": attestation.map(selectors_json),
        });
        self.audit(&ev);
    }
}
