//! The state of one live instance: its SVIDs, its tasks, and the rules for
//! changing them. Every change is recorded in the store (with its audit row,
//! in one transaction) before it is published, so what a client holds is
//! always something the store knows about and can revoke.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::audit::{event, selectors_json};
use super::{BeginTask, Error, INSTANCE_HINT, IdentitySet, Shared, TaskInfo, schedule};
use crate::attest::Attestation;
use crate::ca::{Svid, SvidRequest};
use crate::ids::{Echo, SpiffeId};
use crate::policy::{Entry, Requester, TaskRefusal};

/// Most Begin allowances kept before full ones are forgotten.
const MAX_BEGIN_BUCKETS: usize = 4096;
use crate::store::{AuditKind, InstanceRecord, SvidRecord, TaskRecord};

/// An SVID and the moment it is due for rotation (jitter drawn once).
struct Held {
    svid: Svid,
    rotate_at: SystemTime,
}

impl Held {
    fn new(svid: Svid) -> Self {
        let rotate_at = schedule::rotation_time(svid.issued_at, svid.not_after, rand::random());
        Self { svid, rotate_at }
    }
}

struct LiveTask {
    info: TaskInfo,
    held: Held,
}

/// One live instance.
pub(crate) struct Live {
    pub(crate) attestation: Attestation,
    entries: Vec<Arc<Entry>>,
    instance_svids: Vec<Held>,
    tasks: BTreeMap<String, LiveTask>,
}

impl Live {
    /// Mints the instance's SVIDs, records the instance, and brings back its
    /// unexpired tasks from the store (after a restart or a reconnect).
    pub(crate) fn start(
        shared: &Shared,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
    ) -> Result<Self, Error> {
        let record = instance_record(shared, &attestation);
        let mut ev = event(
            AuditKind::Attestation,
            &format!("pid:{} uid:{}", record.pid, record.uid),
        );
        ev.instance_id = Some(record.instance_id.clone());
        ev.detail = json!({
            "selectors": selectors_json(&attestation),
            "entries": entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
        });
        shared.store.transaction(|tx| {
            tx.upsert_instance(&record)?;
            tx.append_audit(&ev).map(|_| ())
        })?;
        tracing::info!(instance = %attestation.instance_id, pid = record.pid, selectors = %selectors_json(&attestation), "attested an instance");
        let mut live = Self {
            attestation,
            entries,
            instance_svids: Vec::new(),
            tasks: BTreeMap::new(),
        };
        live.instance_svids = live.mint_instance_svids(shared, AuditKind::Issuance)?;
        live.restore_tasks(shared)?;
        Ok(live)
    }

    fn restore_tasks(&mut self, shared: &Shared) -> Result<(), Error> {
        let id = self.attestation.instance_id.to_string();
        for record in shared.store.live_tasks(&id)? {
            if record.expires_at <= SystemTime::now() {
                self.revoke_task_svids(
                    shared,
                    &record.task_id,
                    "expired while the daemon was away",
                    "daemon",
                )?;
                continue;
            }
            let info = TaskInfo {
                spiffe_id: self.task_spiffe_id(&record.task_id)?,
                task_id: record.task_id,
                started_at: record.started_at,
                expires_at: record.expires_at,
                attributes: record.attributes,
            };
            let held = self.mint_task_svid(shared, &info, AuditKind::Issuance)?;
            tracing::info!(instance = %self.attestation.instance_id, task = %info.task_id, "restored a task");
            self.tasks
                .insert(info.task_id.clone(), LiveTask { info, held });
        }
        Ok(())
    }

    /// What the instance's streams carry: instance SVIDs first, then tasks.
    pub(crate) fn identity_set(&self) -> Arc<IdentitySet> {
        let mut tasks: Vec<&LiveTask> = self.tasks.values().collect();
        tasks.sort_by(|a, b| {
            (a.info.started_at, &a.info.task_id).cmp(&(b.info.started_at, &b.info.task_id))
        });
        let svids = self
            .instance_svids
            .iter()
            .chain(tasks.into_iter().map(|t| &t.held))
            .map(|h| h.svid.clone())
            .collect();
        Arc::new(IdentitySet {
            instance_id: self.attestation.instance_id.clone(),
            pid: self.attestation.facts.pid,
            svids,
        })
    }

    /// The next moment something is due: a rotation or a task's end.
    pub(crate) fn next_wake(&self) -> SystemTime {
        let rotations = self.instance_svids.iter().map(|h| h.rotate_at);
        let tasks = self
            .tasks
            .values()
            .flat_map(|t| [t.held.rotate_at, t.info.expires_at]);
        rotations
            .chain(tasks)
            .min()
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600))
    }

    /// True when some SVID is due for rotation at `now`.
    pub(crate) fn rotation_due(&self, now: SystemTime) -> bool {
        self.instance_svids.iter().any(|h| h.rotate_at <= now)
            || self.tasks.values().any(|t| t.held.rotate_at <= now)
    }

    /// The live tasks.
    pub(crate) fn list(&self) -> Vec<TaskInfo> {
        self.tasks.values().map(|t| t.info.clone()).collect()
    }

    /// Starts a task after checking the instance's entry policy: every
    /// rule, then (for the agent's own Begins) the rate, all before anything
    /// is stored or audited. `now` is the monotonic clock the rate uses.
    pub(crate) fn begin(
        &mut self,
        shared: &Shared,
        req: BeginTask,
        requester: Requester,
        actor: &str,
        now: Instant,
    ) -> Result<TaskInfo, Error> {
        let entry = self.primary_entry()?.clone();
        let task_id = match req.task_id.filter(|id| !id.is_empty()) {
            Some(id) => id,
            None => format!("task-{}", hex::encode(rand::random::<[u8; 6]>())),
        };
        let ttl = req.ttl.unwrap_or(shared.settings.task_ttl);
        entry.tasks.check(
            &entry.name,
            requester,
            &task_id,
            ttl,
            &req.attributes,
            self.tasks.len(),
        )?;
        if self.tasks.contains_key(&task_id) {
            return Err(TaskRefusal::DuplicateTask(Echo::new(&task_id)).into());
        }
        // Operators (admin API, authorised by uid) are not rate limited.
        if requester == Requester::Agent {
            // Buckets only: a poisoned lock still holds usable state.
            let mut begins = shared.begins.lock().unwrap_or_else(|p| p.into_inner());
            if begins.len() > MAX_BEGIN_BUCKETS {
                begins.retain(|_, bucket| !bucket.is_full(now));
            }
            let key = (entry.name.clone(), self.attestation.facts.uid);
            entry
                .tasks
                .take_begin(&entry.name, begins.entry(key).or_default(), now)?;
        }
        let now = SystemTime::now();
        let info = TaskInfo {
            spiffe_id: self.task_spiffe_id(&task_id)?,
            task_id,
            started_at: now,
            expires_at: now + ttl,
            attributes: req.attributes,
        };
        let record = TaskRecord {
            instance_id: self.attestation.instance_id.to_string(),
            task_id: info.task_id.clone(),
            spiffe_id: info.spiffe_id.to_string(),
            started_at: info.started_at,
            expires_at: info.expires_at,
            attributes: info.attributes.clone(),
            started_by: actor.to_owned(),
            ended_at: None,
            end_reason: None,
        };
        let mut ev = event(AuditKind::TaskBegin, actor);
        ev.instance_id = Some(record.instance_id.clone());
        ev.task_id = Some(record.task_id.clone());
        ev.spiffe_id = Some(record.spiffe_id.clone());
        ev.detail = json!({ "ttl_secs": ttl.as_secs(), "attributes": &record.attributes });
        shared.store.transaction(|tx| {
            tx.insert_task(&record)?;
            tx.append_audit(&ev).map(|_| ())
        })?;
        let held = match self.mint_task_svid(shared, &info, AuditKind::Issuance) {
            Ok(held) => held,
            Err(e) => {
                // No SVID, no task: do not leave a live task in the store.
                let _ = self.revoke_task_svids(
                    shared,
                    &info.task_id,
                    "could not issue its SVID",
                    actor,
                );
                return Err(e);
            }
        };
        tracing::info!(instance = %self.attestation.instance_id, task = %info.task_id, %actor, "task began");
        self.tasks.insert(
            info.task_id.clone(),
            LiveTask {
                info: info.clone(),
                held,
            },
        );
        Ok(info)
    }

    /// Ends a task: it leaves the streams and its SVIDs are revoked.
    pub(crate) fn end(
        &mut self,
        shared: &Shared,
        task_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<TaskInfo, Error> {
        if !self.tasks.contains_key(task_id) {
            return Err(Error::UnknownTask(Echo::new(task_id)));
        }
        // Record first: a task leaves memory only once its end and its
        // revocations are in the store.
        self.revoke_task_svids(shared, task_id, reason, actor)?;
        let task = self
            .tasks
            .remove(task_id)
            .ok_or_else(|| Error::UnknownTask(Echo::new(task_id)))?;
        tracing::info!(instance = %self.attestation.instance_id, task = %task_id, %reason, "task ended");
        Ok(task.info)
    }

    /// Ends every task whose TTL has run out. Returns whether any ended.
    pub(crate) fn expire_tasks(&mut self, shared: &Shared, now: SystemTime) -> Result<bool, Error> {
        let expired: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.info.expires_at <= now)
            .map(|t| t.info.task_id.clone())
            .collect();
        for id in &expired {
            self.end(shared, id, "ttl expired", "daemon")?;
        }
        Ok(!expired.is_empty())
    }

    /// Replaces the SVIDs that are due, after a fresh attestation.
    pub(crate) fn rotate_due(
        &mut self,
        shared: &Shared,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
        now: SystemTime,
    ) -> Result<(), Error> {
        let same_entries = entries
            .iter()
            .map(|e| &e.name)
            .eq(self.entries.iter().map(|e| &e.name));
        // Re-attested just now: refresh what the store says of the process.
        shared
            .store
            .upsert_instance(&instance_record(shared, &attestation))?;
        self.attestation = attestation;
        self.entries = entries;
        if !same_entries || self.instance_svids.iter().any(|h| h.rotate_at <= now) {
            let fresh = self.mint_instance_svids(shared, AuditKind::Rotation)?;
            let old = std::mem::replace(&mut self.instance_svids, fresh);
            if !same_entries {
                // The process no longer qualifies for some entry: its SVID
                // for that entry must not stay valid until it expires.
                self.revoke_superseded(shared, &old, "its entries changed")?;
            }
        }
        let due: Vec<TaskInfo> = self
            .tasks
            .values()
            .filter(|t| t.held.rotate_at <= now)
            .map(|t| t.info.clone())
            .collect();
        for info in due {
            let held = self.mint_task_svid(shared, &info, AuditKind::Rotation)?;
            if let Some(task) = self.tasks.get_mut(&info.task_id) {
                task.held = held;
            }
        }
        Ok(())
    }

    /// Ends the instance: every task ends, every unexpired SVID is revoked.
    pub(crate) fn end_all(
        &mut self,
        shared: &Shared,
        reason: &str,
        actor: &str,
    ) -> Result<(), Error> {
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            self.end(shared, &id, reason, actor)?;
        }
        shared.end_stored_instance(self.attestation.instance_id.as_str(), reason)
    }

    fn primary_entry(&self) -> Result<&Arc<Entry>, Error> {
        self.entries.first().ok_or(Error::InstanceEnded)
    }

    /// `<instance SPIFFE ID>/task/<task id>`.
    fn task_spiffe_id(&self, task_id: &str) -> Result<SpiffeId, Error> {
        let base = self
            .instance_svids
            .first()
            .map(|h| h.svid.spiffe_id.to_string());
        let base = base.ok_or(Error::InstanceEnded)?;
        let text = format!("{base}/task/{task_id}");
        SpiffeId::new(&text).map_err(|_| TaskRefusal::BadTaskId(Echo::new(task_id)).into())
    }

    fn mint_instance_svids(&self, shared: &Shared, kind: AuditKind) -> Result<Vec<Held>, Error> {
        let mut held = Vec::with_capacity(self.entries.len());
        for (i, entry) in self.entries.iter().enumerate() {
            let spiffe_id = entry
                .spiffe_id_for(&shared.trust_domain, &self.attestation)
                .map_err(|source| Error::Template {
                    entry: entry.name.clone(),
                    source,
                })?;
            let hint = if i == 0 {
                INSTANCE_HINT.to_owned()
            } else {
                format!("entry:{}", entry.name)
            };
            let req = SvidRequest {
                spiffe_id,
                dns_names: entry.dns_names.clone(),
                ttl: entry.ttl.unwrap_or(shared.settings.instance_ttl),
                hint,
            };
            held.push(self.mint(shared, &req, None, kind)?);
        }
        Ok(held)
    }

    fn mint_task_svid(
        &self,
        shared: &Shared,
        info: &TaskInfo,
        kind: AuditKind,
    ) -> Result<Held, Error> {
        let left = info
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let covers_the_task = left <= shared.settings.task_ttl;
        let req = SvidRequest {
            spiffe_id: info.spiffe_id.clone(),
            dns_names: Vec::new(),
            ttl: left
                .min(shared.settings.task_ttl)
                .max(Duration::from_secs(1)),
            hint: format!("task:{}", info.task_id),
        };
        let mut held = self.mint(shared, &req, Some(&info.task_id), kind)?;
        // An SVID that lasts to the task's end is never rotated: the task
        // ends first (rotating it would mint ever shorter SVIDs).
        if covers_the_task {
            held.rotate_at = info.expires_at;
        }
        Ok(held)
    }

    /// Signs an SVID and records it with its audit row; only a recorded SVID
    /// is ever handed out, so every SVID can later be revoked.
    fn mint(
        &self,
        shared: &Shared,
        req: &SvidRequest,
        task_id: Option<&str>,
        kind: AuditKind,
    ) -> Result<Held, Error> {
        let svid = shared.ca.sign_svid(req)?;
        let record = SvidRecord {
            serial: svid.serial.clone(),
            spiffe_id: svid.spiffe_id.to_string(),
            instance_id: self.attestation.instance_id.to_string(),
            task_id: task_id.map(str::to_owned),
            not_before: svid.not_before,
            not_after: svid.not_after,
            revoked_at: None,
            revoke_reason: None,
        };
        let mut ev = event(kind, "daemon");
        ev.instance_id = Some(record.instance_id.clone());
        ev.task_id = record.task_id.clone();
        ev.spiffe_id = Some(record.spiffe_id.clone());
        ev.serial = Some(record.serial.clone());
        ev.detail = json!({ "hint": svid.hint, "ttl_secs": req.ttl.as_secs() });
        shared.store.transaction(|tx| {
            tx.record_svid(&record)?;
            tx.append_audit(&ev).map(|_| ())
        })?;
        tracing::info!(instance = %self.attestation.instance_id, spiffe_id = %svid.spiffe_id, serial = %svid.serial, kind = %kind, "issued an X509-SVID");
        Ok(Held::new(svid))
    }

    fn revoke_superseded(&self, shared: &Shared, old: &[Held], reason: &str) -> Result<(), Error> {
        let now = SystemTime::now();
        let serials: Vec<String> = old.iter().map(|h| h.svid.serial.clone()).collect();
        let mut ev = event(AuditKind::Revocation, "daemon");
        ev.instance_id = Some(self.attestation.instance_id.to_string());
        ev.detail = json!({ "serials": &serials, "reason": reason });
        shared.store.transaction(|tx| {
            for serial in &serials {
                tx.revoke_serial(serial, now, reason)?;
            }
            tx.append_audit(&ev).map(|_| ())
        })?;
        shared.crl.refresh();
        Ok(())
    }

    fn revoke_task_svids(
        &self,
        shared: &Shared,
        task_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<(), Error> {
        let instance_id = self.attestation.instance_id.to_string();
        let now = SystemTime::now();
        let mut end = event(AuditKind::TaskEnd, actor);
        end.instance_id = Some(instance_id.clone());
        end.task_id = Some(task_id.to_owned());
        end.detail = json!({ "reason": reason });
        let serials = shared.store.transaction(|tx| {
            tx.end_task(&instance_id, task_id, now, reason)?;
            let serials = tx.revoke_svids(&instance_id, Some(task_id), now, reason)?;
            tx.append_audit(&end)?;
            if !serials.is_empty() {
                let mut ev = event(AuditKind::Revocation, actor);
                ev.instance_id = Some(instance_id.clone());
                ev.task_id = Some(task_id.to_owned());
                ev.detail = json!({ "serials": &serials, "reason": reason });
                tx.append_audit(&ev)?;
            }
            Ok(serials)
        })?;
        if !serials.is_empty() {
            shared.crl.refresh();
        }
        Ok(())
    }
}

/// The store's view of an attested process, seen now. (The store keeps the
/// first `first_seen` of an instance and refreshes `last_seen`.)
fn instance_record(shared: &Shared, attestation: &Attestation) -> InstanceRecord {
    let now = SystemTime::now();
    InstanceRecord {
        instance_id: attestation.instance_id.to_string(),
        pid: attestation.facts.pid,
        start_time: attestation.facts.start_time,
        boot_id: shared.attestor.boot_id().to_owned(),
        uid: attestation.facts.uid,
        selectors: attestation
            .selectors
            .iter()
            .map(ToString::to_string)
            .collect(),
        first_seen: now,
        last_seen: now,
        ended_at: None,
        end_reason: None,
    }
}

impl Shared {
    /// Ends an instance in the store: its live tasks end, its unexpired
    /// SVIDs are revoked, and the CRL is refreshed.
    pub(crate) fn end_stored_instance(&self, instance_id: &str, reason: &str) -> Result<(), Error> {
        let now = SystemTime::now();
        let serials = self.store.transaction(|tx| {
            for task in tx.live_tasks(instance_id)? {
                tx.end_task(instance_id, &task.task_id, now, reason)?;
            }
            let serials = tx.revoke_svids(instance_id, None, now, reason)?;
            tx.end_instance(instance_id, now, reason)?;
            let mut ev = event(AuditKind::InstanceEnd, "daemon");
            ev.instance_id = Some(instance_id.to_owned());
            ev.detail = json!({ "reason": reason, "revoked_serials": &serials });
            tx.append_audit(&ev)?;
            Ok(serials)
        })?;
        tracing::info!(instance = %instance_id, %reason, revoked = serials.len(), "instance ended");
        if !serials.is_empty() {
            self.crl.refresh();
        }
        Ok(())
    }
}
