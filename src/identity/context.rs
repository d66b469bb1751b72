//! What every instance actor and the manager share: attestation, the
//! entries, the CA (behind the [`Mint`] seam), the store, settings, the CRL
//! trigger, the refusal limiter and the task-Begin allowances. Read-mostly;
//! the only mutable parts are the two small limiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::revoke::CrlTrigger;
use super::{Error, SvidSettings, audit};
use crate::attest::{Attestation, Attestor};
use crate::ca::{self, Ca, Svid, SvidRequest};
use crate::ids::TrustDomain;
use crate::policy::{Entry, TokenBucket};
use crate::store::Store;

/// Signs SVIDs: the CA in the daemon; a slow or failing one in unit tests
/// (the seam ztunnel puts in front of its CA client).
pub trait Mint: Send + Sync {
    /// Mints one SVID (a fresh key and a signed certificate).
    ///
    /// # Errors
    /// The CA's refusal (e.g. an expired CA).
    fn mint(&self, req: &SvidRequest) -> Result<Svid, ca::Error>;
}

impl Mint for Ca {
    fn mint(&self, req: &SvidRequest) -> Result<Svid, ca::Error> {
        self.sign_svid(req)
    }
}

/// Everything the instance actors share.
pub(crate) struct Context {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) attestor: Attestor,
    /// The entries in force (replaced whole when they change).
    pub(crate) entries: super::entries::Current,
    pub(crate) mint: Arc<dyn Mint>,
    pub(crate) store: Arc<Store>,
    pub(crate) settings: SvidSettings,
    /// `allow_unauthenticated_verifiers`: the bundle for callers matching
    /// no entry.
    pub(crate) open_bundle: bool,
    pub(crate) crl: CrlTrigger,
    pub(crate) refusals: audit::RefusalLimiter,
    /// Begin allowances per entry and uid, shared by all that uid's
    /// processes under the entry: a process that exits and is started
    /// again does not get a fresh burst.
    pub(crate) begins: Mutex<HashMap<(String, u32), TokenBucket>>,
    /// Blocking attestation work in flight, per uid.
    pub(crate) attesting: UidSlots,
    /// Where each new SVID's rotation falls in its window.
    pub(crate) jitter: super::schedule::Jitter,
}

/// Attestations and program checks (blocking /proc reads, which can hang
/// on a binary on a FUSE mount) in flight per uid.
pub(crate) const ATTESTATIONS_PER_UID: usize = 2;

/// Blocking-pool threads kept for the store's reads, CRL signing and the
/// holder walker: attestation never takes them, however many uids hang.
pub(crate) const RESERVED_BLOCKING_THREADS: usize = 2;

/// Most uids tracked before idle ones are forgotten.
const MAX_TRACKED_UIDS: usize = 1024;

/// Who may run blocking /proc work now: per uid at most
/// [`ATTESTATIONS_PER_UID`], and all uids together at most the blocking
/// pool minus [`RESERVED_BLOCKING_THREADS`]. The permits go with the work
/// onto its thread, so work that hangs keeps holding them even when its
/// caller gave up: a uid whose reads hang holds at most its share.
pub(crate) struct UidSlots {
    slots: Mutex<HashMap<u32, Arc<Semaphore>>>,
    all: Arc<Semaphore>,
}

impl Default for UidSlots {
    fn default() -> Self {
        Self::with_total(crate::app::blocking_threads().saturating_sub(RESERVED_BLOCKING_THREADS))
    }
}

/// The permits blocking work of one uid holds while it runs.
pub(crate) struct Slot {
    _uid: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl UidSlots {
    /// Slots for `total` pieces of work at once (at least one).
    pub(crate) fn with_total(total: usize) -> Self {
        Self {
            slots: Mutex::default(),
            all: Arc::new(Semaphore::new(total.max(1))),
        }
    }

    /// Waits for one of `uid`'s slots, then for one of all.
    pub(crate) async fn acquire(&self, uid: u32) -> Option<Slot> {
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= MAX_TRACKED_UIDS {
                slots.retain(|_, s| s.available_permits() < ATTESTATIONS_PER_UID);
            }
            slots
                .entry(uid)
                .or_insert_with(|| Arc::new(Semaphore::new(ATTESTATIONS_PER_UID)))
                .clone()
        };
        // Never closed, so these only fail if that changes.
        let uid_permit = semaphore.acquire_owned().await.ok()?;
        let all = self.all.clone().acquire_owned().await.ok()?;
        Some(Slot {
            _uid: uid_permit,
            _all: all,
        })
    }
}

impl Context {
    /// Runs blocking attestation work `f` on the blocking pool, within
    /// `uid`'s share of it.
    ///
    /// # Errors
    /// [`Error::ShuttingDown`] when the runtime is going away.
    pub(crate) async fn attest_off_thread<T, F>(
        self: &Arc<Self>,
        uid: u32,
        f: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Attestor) -> T + Send + 'static,
    {
        let slot = self.attesting.acquire(uid).await;
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = f(&ctx.attestor);
            drop(slot);
            result
        })
        .await
        .map_err(|_| Error::ShuttingDown)
    }

    /// `n` SVIDs were revoked (and recorded) for `reason`: counted, and a
    /// new CRL is asked for. Every revocation goes through here.
    pub(crate) fn revoked(&self, reason: crate::metrics::RevokeReason, n: usize) {
        if n > 0 {
            crate::metrics::global().svids_revoked(reason, n as u64);
            self.crl.refresh();
        }
    }

    /// The entries that admit this attested process.
    pub(crate) fn matching(&self, attestation: &Attestation) -> Result<Vec<Arc<Entry>>, Error> {
        let entries = self.entries.get().matching(attestation);
        if entries.is_empty() {
            return Err(Error::NoMatchingEntry {
                pid: attestation.facts.pid,
                selectors: attestation.selectors.clone(),
            });
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_uid_with_every_slot_taken_waits_while_other_uids_go_on() {
        let slots = UidSlots::with_total(8);
        let mut held = Vec::new();
        for _ in 0..ATTESTATIONS_PER_UID {
            held.push(slots.acquire(1000).await);
        }
        let third = tokio::time::timeout(std::time::Duration::from_secs(5), slots.acquire(1000));
        assert!(third.await.is_err(), "uid 1000 is at its share");
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), slots.acquire(1001));
        assert!(other.await.is_ok(), "another uid still gets a slot");
        held.pop();
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), slots.acquire(1000));
        assert!(again.await.is_ok(), "a freed slot is reused");
    }

    #[tokio::test(start_paused = true)]
    async fn uids_together_never_take_more_than_the_total() {
        let slots = UidSlots::with_total(3);
        let mut held = Vec::new();
        for uid in [1, 2, 3] {
            held.push(slots.acquire(uid).await);
        }
        let fourth = tokio::time::timeout(std::time::Duration::from_secs(5), slots.acquire(4));
        assert!(fourth.await.is_err(), "the reserve is never taken");
        held.pop();
        let fourth = tokio::time::timeout(std::time::Duration::from_secs(5), slots.acquire(4));
        assert!(fourth.await.is_ok());
    }
}
