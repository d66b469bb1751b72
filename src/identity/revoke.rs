//! The CRL publisher: turns the store's revocations into one signed CRL,
//! shared by every verifier's FetchX509Bundles stream (agents' SVID streams
//! carry none; see `workload_api::convert`).
//!
//! What it lists: every revoked SVID until shortly after it expires,
//! including the SVIDs of processes that have exited. An exited process's
//! key is gone only if it never left the process, and the daemon cannot
//! know that: `sigil fetch x509 --write` and `sigil helper` write keys to
//! files by design, a child may have inherited one, and an attacker who
//! read the process's memory holds a copy. The CRL is the only way to end
//! such a key's use before it expires. The cost is bounded (exits within
//! one SVID lifetime) and is paid only by verifiers' streams.
//!
//! Revocations that arrive together are coalesced: a change only wakes the
//! publisher, which waits [`COALESCE`] and then signs once from the store,
//! so ten tasks ending at once cost one signature and one push. Entries leave
//! the CRL shortly after their certificate expires (allowing for clock skew);
//! the publisher wakes for that, and
//! re-signs well before the CRL's own nextUpdate.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::TrustBundle;
use crate::ca::crl::RevokedEntry;
use crate::ca::{Ca, profile};
use crate::store::Store;

/// How long the publisher gathers changes before signing.
pub const COALESCE: Duration = Duration::from_millis(50);
/// How long a CRL is valid (its nextUpdate); re-signed at half of it.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600); // 1 day
/// How often housekeeping deletes long-expired SVID records.
const PRUNE_EVERY: Duration = Duration::from_secs(3600); // 1 hour
/// How long expired SVID records are kept before housekeeping deletes them.
const KEEP_EXPIRED: Duration = Duration::from_secs(7 * 24 * 3600); // 7 days
/// Pause after a failure to build a CRL (e.g. the store is unreadable).
const RETRY: Duration = Duration::from_secs(1);

/// Wakes the publisher; cheap to clone and call from anywhere.
#[derive(Clone)]
pub(crate) struct CrlTrigger(Arc<Notify>);

impl CrlTrigger {
    /// Asks for a new CRL soon. Never blocks; several calls make one CRL.
    pub(crate) fn refresh(&self) {
        self.0.notify_one();
    }
}

/// Starts the publisher: it signs a first CRL at once, then on every change.
pub(crate) fn spawn_publisher(
    store: Arc<Store>,
    ca: Arc<Ca>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> CrlTrigger {
    let notify = Arc::new(Notify::new());
    let trigger = CrlTrigger(notify.clone());
    tracker.spawn(async move {
        let mut last_prune: Option<Instant> = None;
        loop {
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                let pruned = store
                    .write_async(|tx| tx.prune_expired_svids(SystemTime::now(), KEEP_EXPIRED))
                    .await;
                if let Err(e) = pruned {
                    tracing::warn!(error = %e, "cannot prune expired SVID records");
                }
                last_prune = Some(Instant::now());
            }
            let next = match publish(&store, &ca, &bundle).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build the CRL; retrying");
                    SystemTime::now() + RETRY
                }
            };
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = notify.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(COALESCE) => {}
            }
        }
    });
    trigger
}

/// Signs a CRL of the revoked, unexpired SVIDs and publishes it. Returns
/// when the next one is due (an entry expiring, or half the validity).
async fn publish(
    store: &Arc<Store>,
    ca: &Arc<Ca>,
    bundle: &watch::Sender<Arc<TrustBundle>>,
) -> Result<SystemTime, Box<dyn std::error::Error>> {
    let now = SystemTime::now();
    // An entry stays listed for BACKDATE past its certificate's expiry: a
    // verifier whose clock is that far behind still sees it revoked.
    let revoked = store
        .read_async(move |store| store.revoked_unexpired(now - profile::BACKDATE))
        .await?;
    let entries: Vec<RevokedEntry> = revoked
        .iter()
        .map(|r| RevokedEntry {
            serial_hex: r.serial.clone(),
            revoked_at: r.revoked_at,
        })
        .collect();
    let number = store.write_async(|tx| tx.next_crl_number()).await?;
    // Signing encodes every entry: off the async workers.
    let signer = ca.clone();
    let listed = entries.len();
    let der = tokio::task::spawn_blocking(move || {
        signer.sign_crl(
            number,
            &entries,
            now - profile::BACKDATE,
            now + CRL_VALIDITY,
        )
    })
    .await??;
    let crl_bytes = der.len();
    bundle.send_modify(|current| {
        let mut updated = TrustBundle::clone(current);
        updated.crls = vec![der];
        *current = Arc::new(updated);
    });
    tracing::debug!(crl_number = number, entries = listed, "published a CRL");
    crate::metrics::global().set_crl(listed, crl_bytes);
    let soonest_expiry = revoked
        .iter()
        .map(|r| r.not_after + profile::BACKDATE)
        .min();
    let half_life = now + CRL_VALIDITY / 2;
    Ok(soonest_expiry.map_or(half_life, |t| t.min(half_life)))
}
