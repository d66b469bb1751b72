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
use crate::policy::{Entry, EntrySet, TokenBucket};
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
    pub(crate) entries: EntrySet,
    pub(crate) mint: Arc<dyn Mint>,
    pub(crate) store: Arc<Store>,
    pub(crate) settings: SvidSettings,
    pub(crate) crl: CrlTrigger,
    pub(crate) refusals: audit::RefusalLimiter,
    /// Begin allowances per entry and uid, shared by all that uid's
    /// processes under the entry: a process that exits and is started
    /// again does not get a fresh burst.
    pub(crate) begins: Mutex<HashMap<(String, u32), TokenBucket>>,
    /// Blocking attestation work in flight, per uid.
    pub(crate) attesting: UidSlots,
}

/// Attestations (blocking /proc reads) in flight per uid. The blocking pool
/// is small (see `app::runtime`); a uid whose processes' reads hang (a
/// binary on its own FUSE mount) holds at most this many of its threads,
/// and every other uid is still attested.
pub(crate) const ATTESTATIONS_PER_UID: usize = 2;

/// Most uids tracked before idle ones are forgotten.
const MAX_TRACKED_UIDS: usize = 1024;

/// Per-uid semaphores of [`ATTESTATIONS_PER_UID`] permits.
#[derive(Default)]
pub(crate) struct UidSlots {
    slots: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl UidSlots {
    /// Waits for one of `uid`'s slots.
    pub(crate) async fn acquire(&self, uid: u32) -> Option<OwnedSemaphorePermit> {
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
        // Never closed, so this only fails if that changes; then unlimited.
        semaphore.acquire_owned().await.ok()
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
        let _slot = self.attesting.acquire(uid).await;
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || f(&ctx.attestor))
            .await
            .map_err(|_| Error::ShuttingDown)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_uid_with_every_slot_taken_waits_while_other_uids_go_on() {
        let slots = UidSlots::default();
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
}
