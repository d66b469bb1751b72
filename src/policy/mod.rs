//! Policy: which attested processes get which identities.
//!
//! Owns registration entries, selector matching, SPIFFE ID templates, task
//! rules (`task`) and the per-instance Begin rate (`rate`).
//! Does not read config files (that is `config`) or the kernel (`attest`):
//! it is plain logic over values, so it is tested without either.

pub mod rate;
pub mod task;
pub mod template;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::attest::{Attestation, Selector};
use crate::ids::{SpiffeId, TrustDomain};
pub use rate::{BeginRate, TokenBucket};
pub use task::{Requester, TaskPolicy, TaskRefusal};
pub use template::{Context, DEFAULT_TEMPLATE, Template, TemplateError};

/// A registration entry: the selectors a process must all have, and the
/// identity it then gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Unique name; a SPIFFE path segment, used by the default template.
    pub name: String,
    /// The team or person accountable for the agent, if the entry names
    /// one (printable, 1 to 128 bytes; checked by `config`).
    pub owner: Option<String>,
    /// Every one of these must be among the process's attested selectors.
    /// Never empty: an entry that admits everyone is refused at load time.
    pub selectors: Vec<Selector>,
    /// How the SVID's SPIFFE ID is made.
    pub spiffe_id: Template,
    /// SVID lifetime for this entry; the daemon default when `None`.
    pub ttl: Option<Duration>,
    /// DNS SANs added to the SVID.
    pub dns_names: Vec<String>,
    /// What tasks its instances may run.
    pub tasks: TaskPolicy,
}

impl Entry {
    /// True when the process has every selector this entry requires.
    pub fn admits(&self, selectors: &BTreeSet<Selector>) -> bool {
        !self.selectors.is_empty() && self.selectors.iter().all(|s| selectors.contains(s))
    }

    /// The SPIFFE ID this entry gives an attested process.
    ///
    /// # Errors
    /// When the template renders to an invalid ID (e.g. `{uid}` where a
    /// segment is required to be non-empty is fine, but a literal `..` is not).
    pub fn spiffe_id_for(
        &self,
        trust_domain: &TrustDomain,
        attestation: &Attestation,
    ) -> Result<SpiffeId, TemplateError> {
        self.spiffe_id.render(&Context {
            trust_domain,
            entry: &self.name,
            instance: &attestation.instance_id,
            uid: attestation.facts.uid,
        })
    }
}

/// The entries in force, in config order.
#[derive(Clone, Debug, Default)]
pub struct EntrySet {
    entries: Vec<Arc<Entry>>,
}

impl EntrySet {
    /// Wraps entries that `config` has validated (names unique, selectors
    /// non-empty).
    pub fn new(entries: Vec<Entry>) -> Self {
        Self {
            entries: entries.into_iter().map(Arc::new).collect(),
        }
    }

    /// Wraps entries already shared (the identity module's entry book).
    pub fn from_arcs(entries: Vec<Arc<Entry>>) -> Self {
        Self { entries }
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries.iter()
    }

    /// Every entry the attested process matches, in config order. A process
    /// that matches several entries gets one SVID per entry.
    pub fn matching(&self, attestation: &Attestation) -> Vec<Arc<Entry>> {
        self.entries
            .iter()
            .filter(|e| e.admits(&attestation.selectors))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::{ProcessFacts, SelectorKind};
    use crate::ids::InstanceId;

    fn entry(name: &str, selectors: &[&str]) -> Entry {
        Entry {
            name: name.into(),
            owner: None,
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            spiffe_id: DEFAULT_TEMPLATE.parse().unwrap(),
            ttl: None,
            dns_names: vec![],
            tasks: TaskPolicy::default(),
        }
    }

    fn attestation(selectors: &[&str]) -> Attestation {
        Attestation {
            instance_id: InstanceId::derive("b", 1, 1, crate::ids::ExeId::new(1, 1, b"/bin/x")),
            facts: ProcessFacts {
                pid: 1,
                start_time: 1,
                uid: 1000,
                gid: 1000,
                supplementary_gids: vec![],
                exe: "/bin/agent".into(),
                exe_sha256: "00".repeat(32),
                exe_id: crate::ids::ExeId::new(1, 1, b"/bin/x"),
                parent_exe: None,
                cgroups: vec![],
            },
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn an_entry_admits_only_when_all_its_selectors_match() {
        let set = EntrySet::new(vec![
            entry("uid-only", &["unix:uid:1000"]),
            entry("uid-and-path", &["unix:uid:1000", "unix:path:/bin/agent"]),
            entry("other-uid", &["unix:uid:1001"]),
        ]);
        let a = attestation(&["unix:uid:1000", "unix:path:/bin/agent"]);
        let names: Vec<_> = set.matching(&a).iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["uid-only", "uid-and-path"]);
        let b = attestation(&["unix:uid:1000", "unix:path:/bin/other"]);
        assert_eq!(set.matching(&b).len(), 1);
    }

    #[test]
    fn an_entry_without_selectors_admits_nobody() {
        let e = entry("empty", &[]);
        assert!(!e.admits(&attestation(&["unix:uid:1000"]).selectors));
    }

    #[test]
    fn the_spiffe_id_carries_entry_and_instance() {
        let td = TrustDomain::new("example.org").unwrap();
        let a = attestation(&[]);
        let id = entry("bot", &["unix:uid:1"])
            .spiffe_id_for(&td, &a)
            .unwrap();
        assert_eq!(id.path(), format!("/agent/bot/instance/{}", a.instance_id));
        let _ = SelectorKind::ALL;
    }
}
