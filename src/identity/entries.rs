//! Which registration entries are in force, and what changing them does to
//! the live instances.
//!
//! Entries come from two sources: the config file (changed only by editing
//! it and sending SIGHUP) and the store (created and deleted over the admin
//! API, surviving restarts). One rule lives here: names are unique across
//! both, config entries first and stored ones after, in creation order.
//! Each change is recorded first (a stored entry with its audit row, in one
//! write), then the new set takes effect for new callers, then every live
//! instance is reconciled against it: one whose entries are unchanged keeps
//! its SVIDs; one whose entries changed gets new SVIDs and its old ones are
//! revoked; one that no longer matches any entry ends, its SVIDs revoked
//! and its streams told it lost its identity.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::instance::{self, Command};
use super::{Error, IdentityManager};
use crate::ids::InstanceId;
use crate::policy::{Entry, EntrySet};
use crate::store::{AuditEvent, StoredEntry};

/// Where an entry comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntrySource {
    /// The config file: read-only over the admin API.
    Config,
    /// Created over the admin API and kept in the store.
    Stored {
        /// When it was created.
        created_at: SystemTime,
        /// Who created it (the admin caller).
        created_by: String,
    },
}

/// An entry in force and where it comes from.
#[derive(Clone, Debug)]
pub struct EntryDef {
    /// The entry.
    pub entry: Arc<Entry>,
    /// Its source.
    pub source: EntrySource,
}

/// A stored entry as read back at start-up: validated by the caller (the
/// config module's rules), with its record.
#[derive(Clone, Debug)]
pub struct LoadedEntry {
    /// The validated entry.
    pub entry: Entry,
    /// When it was created.
    pub created_at: SystemTime,
    /// Who created it.
    pub created_by: String,
}

/// How the config file's entries changed on a reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryDiff {
    /// New names.
    pub added: Vec<String>,
    /// Names no longer in the file.
    pub removed: Vec<String>,
    /// Names whose definition changed.
    pub changed: Vec<String>,
}

impl EntryDiff {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn between(old: &[Arc<Entry>], new: &[Arc<Entry>]) -> Self {
        let find = |list: &[Arc<Entry>], name: &str| list.iter().find(|e| e.name == name).cloned();
        let mut diff = Self::default();
        for e in new {
            match find(old, &e.name) {
                None => diff.added.push(e.name.clone()),
                Some(before) if *before != **e => diff.changed.push(e.name.clone()),
                Some(_) => {}
            }
        }
        for e in old {
            if find(new, &e.name).is_none() {
                diff.removed.push(e.name.clone());
            }
        }
        diff
    }
}

/// What reconciling one live instance with a new entry set did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconciled {
    /// Its entries are unchanged: it keeps its SVIDs.
    Unchanged,
    /// Its entries changed: new SVIDs, and these old ones revoked.
    Reissued {
        /// The serials revoked.
        revoked: Vec<String>,
    },
    /// It matches no entry any more (or its process is gone): it ended and
    /// these SVIDs were revoked.
    Ended {
        /// The serials revoked.
        revoked: Vec<String>,
    },
    /// It could not be reconciled now (e.g. a full disk); it retries.
    Failed(String),
}

/// One instance's outcome.
#[derive(Clone, Debug)]
pub struct InstanceReconciled {
    /// The instance.
    pub instance_id: InstanceId,
    /// What happened to it.
    pub outcome: Reconciled,
}

/// The entries from both sources; changed under the manager's lock.
#[derive(Default)]
pub(crate) struct Book {
    config: Vec<Arc<Entry>>,
    stored: Vec<(Arc<Entry>, SystemTime, String)>,
}

impl Book {
    pub(crate) fn new(config: Vec<Entry>, stored: Vec<LoadedEntry>) -> Self {
        let mut book = Self {
            config: config.into_iter().map(Arc::new).collect(),
            stored: Vec::new(),
        };
        for s in stored {
            if book.find(&s.entry.name).is_some() {
                tracing::error!(entry = %s.entry.name, "a stored entry has the name of a config entry; the config entry wins: delete the stored one (`sigil entries delete`)");
                continue;
            }
            book.stored
                .push((Arc::new(s.entry), s.created_at, s.created_by));
        }
        book
    }

    /// The set callers are matched against: config entries, then stored.
    pub(crate) fn set(&self) -> EntrySet {
        EntrySet::from_arcs(
            self.config
                .iter()
                .chain(self.stored.iter().map(|(e, ..)| e))
                .cloned()
                .collect(),
        )
    }

    pub(crate) fn defs(&self) -> Vec<EntryDef> {
        let config = self.config.iter().map(|e| EntryDef {
            entry: e.clone(),
            source: EntrySource::Config,
        });
        let stored = self.stored.iter().map(|(e, at, by)| EntryDef {
            entry: e.clone(),
            source: EntrySource::Stored {
                created_at: *at,
                created_by: by.clone(),
            },
        });
        config.chain(stored).collect()
    }

    pub(crate) fn find(&self, name: &str) -> Option<EntryDef> {
        self.defs().into_iter().find(|d| d.entry.name == name)
    }
}

/// The entry set callers are matched against now: read on every request,
/// replaced whole on a change, with a generation that counts the changes.
///
/// The generation closes a race: an instance matched against the old set
/// that becomes live only after a change has reconciled every live
/// instance would keep an SVID of a deleted entry until its next rotation.
/// Its start reads the generation before matching and compares it once
/// live (`IdentityManager::go_live`); the set is replaced before the live
/// instances are listed for reconciling, so each start is caught by one
/// check or the other.
#[derive(Default)]
pub(crate) struct Current {
    set: RwLock<Arc<EntrySet>>,
    generation: AtomicU64,
}

impl Current {
    pub(crate) fn new(set: EntrySet) -> Self {
        Self {
            set: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self) -> Arc<EntrySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many times the set was replaced.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn replace(&self, set: EntrySet) {
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(serde::Serialize)]
struct EntryChangeDetail<'a> {
    action: &'a str,
    entry: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    selectors: Vec<String>,
}

fn entry_event(
    action: &str,
    name: &str,
    owner: Option<&str>,
    entry: &Entry,
    actor: &str,
) -> AuditEvent {
    let detail = EntryChangeDetail {
        action,
        entry: name,
        owner,
        selectors: entry.selectors.iter().map(ToString::to_string).collect(),
    };
    super::audit::admin_event(actor, &detail)
}

/// The audit row of a change to a stored entry that is not in force.
fn entry_event_bare(action: &str, name: &str, actor: &str) -> AuditEvent {
    let detail = EntryChangeDetail {
        action,
        entry: name,
        owner: None,
        selectors: Vec::new(),
    };
    super::audit::admin_event(actor, &detail)
}

impl IdentityManager {
    /// Every entry in force, config entries first.
    pub async fn entry_defs(&self) -> Vec<EntryDef> {
        self.book.lock().await.defs()
    }

    /// The entry named `name`.
    ///
    /// # Errors
    /// [`Error::UnknownEntry`].
    pub async fn entry_def(&self, name: &str) -> Result<EntryDef, Error> {
        self.book
            .lock()
            .await
            .find(name)
            .ok_or_else(|| Error::UnknownEntry(name.to_owned()))
    }

    /// Stores a new entry (validated by the caller exactly like a config
    /// entry; `spec_json` is what the store keeps and re-validates at the
    /// next start). It admits new processes at once; live ones that now
    /// match it get its SVID too. Runs to its end even if the caller goes
    /// away (see [`IdentityManager::detached`]).
    ///
    /// # Errors
    /// [`Error::EntryExists`] when the name is taken; [`Error::Store`].
    pub async fn create_entry(
        &self,
        entry: Entry,
        spec_json: String,
        actor: &str,
    ) -> Result<(EntryDef, Vec<InstanceReconciled>), Error> {
        let actor = actor.to_owned();
        self.detached(move |m| async move { m.create_entry_now(entry, spec_json, actor).await })
            .await
    }

    async fn create_entry_now(
        &self,
        entry: Entry,
        spec_json: String,
        actor: String,
    ) -> Result<(EntryDef, Vec<InstanceReconciled>), Error> {
        let mut book = self.book.lock().await;
        if book.find(&entry.name).is_some() {
            return Err(Error::EntryExists(entry.name));
        }
        let now = SystemTime::now();
        let record = StoredEntry {
            name: entry.name.clone(),
            spec_json,
            owner: entry.owner.clone(),
            created_at: now,
            created_by: actor.clone(),
        };
        let ev = entry_event(
            "entry_create",
            &entry.name,
            entry.owner.as_deref(),
            &entry,
            &actor,
        );
        let written = self
            .ctx
            .store
            .write_async(move |tx| {
                tx.insert_entry(&record)?;
                tx.append_audit(&ev)?;
                Ok(())
            })
            .await;
        match written {
            // A stored row not in force (skipped at start-up) holds the name.
            Err(crate::store::Error::EntryExists { name }) => return Err(Error::EntryExists(name)),
            other => other?,
        }
        let entry = Arc::new(entry);
        book.stored.push((entry.clone(), now, actor.clone()));
        tracing::info!(entry = %entry.name, %actor, "entry created");
        self.ctx.entries.replace(book.set());
        drop(book);
        let reconciled = self.reconcile_all().await;
        let def = EntryDef {
            entry,
            source: EntrySource::Stored {
                created_at: now,
                created_by: actor,
            },
        };
        Ok((def, reconciled))
    }

    /// Deletes a stored entry; what was issued under it is revoked (its
    /// instances get new SVIDs under their other entries, or end). A
    /// stored row that is not in force (skipped at start-up: invalid, or
    /// named like a config entry) is deleted too. Runs to its end even if
    /// the caller goes away.
    ///
    /// # Errors
    /// [`Error::UnknownEntry`]; [`Error::ConfigEntry`] for an entry of the
    /// config file; [`Error::Store`].
    pub async fn delete_entry(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<Vec<InstanceReconciled>, Error> {
        let (name, actor) = (name.to_owned(), actor.to_owned());
        self.detached(move |m| async move { m.delete_entry_now(name, actor).await })
            .await
    }

    async fn delete_entry_now(
        &self,
        name: String,
        actor: String,
    ) -> Result<Vec<InstanceReconciled>, Error> {
        let mut book = self.book.lock().await;
        let at = book.stored.iter().position(|(e, ..)| e.name == name);
        let ev = match at {
            Some(at) => {
                let e = &book.stored[at].0;
                entry_event("entry_delete", &e.name, e.owner.as_deref(), e, &actor)
            }
            None => entry_event_bare("entry_delete", &name, &actor),
        };
        let key = name.clone();
        let deleted = self
            .ctx
            .store
            .write_async(move |tx| {
                let deleted = tx.delete_entry(&key)?;
                if deleted {
                    tx.append_audit(&ev)?;
                }
                Ok(deleted)
            })
            .await?;
        if !deleted {
            return Err(if book.config.iter().any(|e| e.name == name) {
                Error::ConfigEntry(name)
            } else {
                Error::UnknownEntry(name)
            });
        }
        tracing::info!(entry = %name, %actor, "entry deleted");
        let Some(at) = at else {
            // It was not in force: nothing was issued under it.
            return Ok(Vec::new());
        };
        book.stored.remove(at);
        self.ctx.entries.replace(book.set());
        drop(book);
        Ok(self.reconcile_all().await)
    }

    /// Replaces the config file's entries (SIGHUP). Refused, changing
    /// nothing, when a new config entry has a stored entry's name.
    ///
    /// # Errors
    /// [`Error::EntryExists`]; [`Error::Store`] when the audit row cannot
    /// be written (nothing changes then either).
    pub async fn reload_config_entries(
        &self,
        entries: Vec<Entry>,
        actor: &str,
    ) -> Result<(EntryDiff, Vec<InstanceReconciled>), Error> {
        let actor = actor.to_owned();
        self.detached(move |m| async move { m.reload_config_entries_now(entries, actor).await })
            .await
    }

    async fn reload_config_entries_now(
        &self,
        entries: Vec<Entry>,
        actor: String,
    ) -> Result<(EntryDiff, Vec<InstanceReconciled>), Error> {
        let mut book = self.book.lock().await;
        if let Some(clash) = entries
            .iter()
            .find(|e| book.stored.iter().any(|(s, ..)| s.name == e.name))
        {
            return Err(Error::EntryExists(clash.name.clone()));
        }
        let new: Vec<Arc<Entry>> = entries.into_iter().map(Arc::new).collect();
        let diff = EntryDiff::between(&book.config, &new);
        if diff.is_empty() {
            return Ok((diff, Vec::new()));
        }
        #[derive(serde::Serialize)]
        struct ReloadDetail<'a> {
            action: &'a str,
            added: &'a [String],
            removed: &'a [String],
            changed: &'a [String],
        }
        let ev = super::audit::admin_event(
            &actor,
            &ReloadDetail {
                action: "config_reload",
                added: &diff.added,
                removed: &diff.removed,
                changed: &diff.changed,
            },
        );
        self.ctx
            .store
            .write_async(move |tx| tx.append_audit(&ev).map(drop))
            .await?;
        book.config = new;
        self.ctx.entries.replace(book.set());
        drop(book);
        Ok((diff, self.reconcile_all().await))
    }

    /// Reconciles every live instance with the entries in force now (all
    /// at once: each actor does its own). Called after the set was
    /// replaced, without the book's lock, so listings are not held up by
    /// a slow re-attestation.
    async fn reconcile_all(&self) -> Vec<InstanceReconciled> {
        let pending: Vec<_> = self
            .registry
            .handles()
            .into_iter()
            .map(|(id, commands)| {
                tokio::spawn(async move {
                    let outcome =
                        instance::request(&commands, |reply| Command::Reconcile { reply })
                            .await
                            .unwrap_or(Reconciled::Unchanged);
                    InstanceReconciled {
                        instance_id: id,
                        outcome,
                    }
                })
            })
            .collect();
        let mut done = Vec::with_capacity(pending.len());
        for handle in pending {
            if let Ok(r) = handle.await {
                done.push(r);
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DEFAULT_TEMPLATE, TaskPolicy};

    fn entry(name: &str, uid: u32) -> Entry {
        Entry {
            name: name.into(),
            selectors: vec![format!("unix:uid:{uid}").parse().unwrap()],
            spiffe_id: DEFAULT_TEMPLATE.parse().unwrap(),
            ttl: None,
            dns_names: vec![],
            tasks: TaskPolicy::default(),
            owner: None,
        }
    }

    #[test]
    fn a_diff_names_what_was_added_removed_and_changed() {
        let old: Vec<_> = [entry("a", 1), entry("b", 2), entry("c", 3)]
            .into_iter()
            .map(Arc::new)
            .collect();
        let new: Vec<_> = [entry("a", 1), entry("b", 20), entry("d", 4)]
            .into_iter()
            .map(Arc::new)
            .collect();
        let diff = EntryDiff::between(&old, &new);
        assert_eq!(diff.added, ["d"]);
        assert_eq!(diff.removed, ["c"]);
        assert_eq!(diff.changed, ["b"]);
        assert!(EntryDiff::between(&old, &old).is_empty());
    }

    #[test]
    fn a_stored_entry_never_shadows_a_config_entry_and_comes_after_them() {
        let stored = |name: &str| LoadedEntry {
            entry: entry(name, 9),
            created_at: SystemTime::UNIX_EPOCH,
            created_by: "admin".into(),
        };
        let book = Book::new(
            vec![entry("a", 1), entry("b", 2)],
            vec![stored("a"), stored("z")],
        );
        let defs = book.defs();
        let names: Vec<_> = defs.iter().map(|d| d.entry.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "z"]);
        assert_eq!(defs[0].source, EntrySource::Config);
        assert_eq!(
            defs[0].entry.selectors,
            entry("a", 1).selectors,
            "the config's a"
        );
        assert!(matches!(defs[2].source, EntrySource::Stored { .. }));
    }
}
