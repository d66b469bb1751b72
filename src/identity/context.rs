//! What every instance actor and the manager share: attestation, the
//! entries, the CA (behind the [`Mint`] seam), the store, settings, the CRL
//! trigger, the refusal limiter and the task-Begin allowances. Read-mostly;
//! the only mutable parts are the two small limiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
}

impl Context {
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
