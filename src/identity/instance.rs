//! The life of one instance: rotate before expiry, re-attest before each
//! rotation, and stop when the process exits or the daemon shuts down.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{IdentitySet, InstanceState, Shared, schedule};
use crate::attest::{self, exit_watch};
use crate::ids::InstanceId;

/// The background task that owns one instance's state channel.
pub(super) struct InstanceTask {
    shared: Arc<Shared>,
    id: InstanceId,
    pid: u32,
    start_time: u64,
    tx: watch::Sender<InstanceState>,
}

/// What ended an instance's life, or kept it going.
enum Step {
    Continue,
    Stop,
}

impl InstanceTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: InstanceId,
        pid: u32,
        start_time: u64,
        tx: watch::Sender<InstanceState>,
    ) -> Self {
        Self {
            shared,
            id,
            pid,
            start_time,
            tx,
        }
    }

    /// Runs until the process exits, loses its identity, or `shutdown`.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let exited = exit_watch::process_exit(self.pid, self.start_time);
        tokio::pin!(exited);
        loop {
            let delay = self.next_rotation_delay();
            let step = tokio::select! {
                () = shutdown.cancelled() => Step::Stop,
                result = &mut exited => {
                    if let Err(e) = result {
                        tracing::warn!(instance = %self.id, error = %e, "cannot watch the process; dropping it");
                    }
                    tracing::info!(instance = %self.id, pid = self.pid, "process exited; instance dropped");
                    self.end(InstanceState::Exited);
                    Step::Stop
                }
                () = tokio::time::sleep(delay) => self.rotate().await,
            };
            if let Step::Stop = step {
                return;
            }
        }
    }

    fn next_rotation_delay(&self) -> std::time::Duration {
        let state = self.tx.borrow();
        let InstanceState::Active(set) = &*state else {
            return std::time::Duration::ZERO;
        };
        let earliest = set
            .svids
            .iter()
            .map(|s| schedule::rotation_time(s.issued_at, s.not_after, rand::random::<f64>()))
            .min()
            .unwrap_or_else(SystemTime::now);
        schedule::delay_until(earliest, SystemTime::now())
    }

    /// Attests the process again and, if it still qualifies, replaces its SVIDs.
    async fn rotate(&self) -> Step {
        let shared = self.shared.clone();
        let (pid, start) = (self.pid, self.start_time);
        let reattested =
            tokio::task::spawn_blocking(move || shared.attestor.reattest(pid, start)).await;
        let attestation = match reattested {
            Ok(Ok(a)) => a,
            Ok(Err(attest::Error::ProcessGone { .. } | attest::Error::ProcessChanged { .. })) => {
                tracing::info!(instance = %self.id, pid, "process exited; instance dropped");
                self.end(InstanceState::Exited);
                return Step::Stop;
            }
            Ok(Err(e)) => return self.revoke(format!("re-attestation failed: {e}")),
            Err(_) => return Step::Stop, // runtime shutting down
        };
        let entries = match self.shared.matching(&attestation) {
            Ok(entries) => entries,
            Err(e) => return self.revoke(format!("{e} any more")),
        };
        match self.shared.mint(&attestation, &entries) {
            Ok(set) => {
                tracing::info!(instance = %self.id, svids = set.svids.len(), "rotated SVIDs");
                self.publish(set);
            }
            // Keep the current SVIDs; the next attempt comes after a delay
            // computed from them, which is now (past half life): back off.
            Err(e) => {
                tracing::warn!(instance = %self.id, error = %e, "rotation failed; retrying in 1s");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        Step::Continue
    }

    fn publish(&self, set: IdentitySet) {
        self.tx.send_replace(InstanceState::Active(Arc::new(set)));
    }

    fn revoke(&self, reason: String) -> Step {
        tracing::warn!(instance = %self.id, pid = self.pid, %reason, "instance lost its identity");
        self.end(InstanceState::Revoked(reason));
        Step::Stop
    }

    fn end(&self, state: InstanceState) {
        self.shared.remove_instance(&self.id, self.start_time);
        self.tx.send_replace(state);
    }
}
