//! The state of one live instance: its SVIDs, its tasks, and the rules for
//! changing them.
//!
//! Every change is one store write (one job for the writer, see
//! `store/writer.rs`): the records and their audit rows land together, and
//! the change is published only after the write is acknowledged, so what a
//! client holds is always something the store knows about and can revoke.
//! Signing happens before the write; a failed write discards what was
//! signed, unseen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::audit::events::{self, Minted};
use super::context::Context;
use super::{BeginTask, Error, INSTANCE_HINT, IdentitySet, TaskInfo, schedule};
use crate::attest::Attestation;
use crate::ca::{Svid, SvidRequest};
use crate::ids::{Echo, SpiffeId};
use crate::metrics::{RevokeReason, SvidKind};
use crate::policy::{Entry, Requester, TaskRefusal};
use crate::store::{
    AuditEvent, EndReason, InstanceRecord, SvidRecord, TaskEndReason, TaskRecord, Tx,
};

/// Most Begin allowances kept before full ones are forgotten.
const MAX_BEGIN_BUCKETS: usize = 4096;

/// An SVID and the moment it is due for rotation.
struct Held {
    svid: Svid,
    rotate_at: SystemTime,
}

impl Held {
    fn new(svid: Svid, jitter: f64) -> Self {
        let rotate_at = schedule::rotation_time(svid.issued_at, svid.not_after, jitter);
        Self { svid, rotate_at }
    }
}

/// A signed SVID not yet recorded: its row and audit row go into the same
/// write, and it is held only once that write is acknowledged.
struct Signed {
    held: Held,
    record: SvidRecord,
    audit: AuditEvent,
}

impl Signed {
    fn write(&self, tx: &Tx<'_>) -> Result<(), crate::store::Error> {
        tx.record_svid(&self.record)?;
        tx.append_audit(&self.audit).map(drop)
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
    /// Mints the instance's SVIDs and brings back its unexpired tasks (after
    /// a restart or a reconnect), then records all of it in one write that
    /// first checks the instance was not revoked meanwhile.
    ///
    /// # Errors
    /// [`Error::Revoked`] when the store says this instance was revoked;
    /// minting and store errors.
    pub(crate) async fn start(
        ctx: &Arc<Context>,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
    ) -> Result<Self, Error> {
        // One read: a revoked process is refused before anything is signed
        // (the write below checks again, and is the one that decides), and
        // its unexpired tasks come back.
        let id = attestation.instance_id.to_string();
        let (sticky, stored_tasks) = ctx
            .store
            .read_async(move |store| {
                let sticky = store
                    .instance(&id)?
                    .and_then(|r| r.end_reason)
                    .filter(EndReason::is_sticky);
                Ok((sticky, store.live_tasks(&id)?))
            })
            .await?;
        if let Some(end) = sticky {
            return Err(Error::Revoked(end.to_string()));
        }
        let mut live = Self {
            attestation,
            entries,
            instance_svids: Vec::new(),
            tasks: BTreeMap::new(),
        };
        let mut minted = live.mint_instance_svids(ctx, Minted::First)?;
        let base = minted.first().map(|m| m.held.svid.spiffe_id.clone());
        let now = SystemTime::now();
        let mut expired = Vec::new();
        let mut restored = Vec::new();
        for record in stored_tasks {
            if record.expires_at <= now {
                expired.push(record.task_id);
                continue;
            }
            let info = TaskInfo {
                spiffe_id: task_spiffe_id(base.as_ref(), &record.task_id)?,
                task_id: record.task_id,
                started_at: record.started_at,
                expires_at: record.expires_at,
                attributes: record.attributes,
            };
            let m = live.mint_task_svid(ctx, &info, Minted::First)?;
            restored.push((info, m));
        }
        let record = instance_record(ctx, &live.attestation, &live.entries);
        let attested = events::attestation(&live.attestation, &live.entries);
        let instance_svids = std::mem::take(&mut minted);
        let (minted_back, restored, revoked) = ctx
            .store
            .write_async(move |tx| {
                if let Some(end) = tx.sticky_end(&record.instance_id)? {
                    return Ok(Err(end));
                }
                // Ended before for a reason that does not stick (it stopped
                // matching, then matched again): live again, so that a later
                // end, a revocation above all, is recorded on it.
                tx.revive_instance(&record.instance_id)?;
                tx.upsert_instance(&record)?;
                tx.append_audit(&attested)?;
                for m in instance_svids.iter().chain(restored.iter().map(|(_, m)| m)) {
                    m.write(tx)?;
                }
                let mut revoked = Vec::new();
                for task_id in &expired {
                    revoked.extend(end_task_in(
                        tx,
                        &record.instance_id,
                        task_id,
                        &TaskEndReason::ExpiredWhileAway,
                        "daemon",
                    )?);
                }
                Ok(Ok((instance_svids, restored, revoked)))
            })
            .await?
            .map_err(|end| Error::Revoked(end.to_string()))?;
        ctx.revoked(RevokeReason::TaskEnded, revoked.len());
        live.instance_svids = minted_back.into_iter().map(|m| m.held).collect();
        for (info, m) in restored {
            tracing::info!(instance = %live.attestation.instance_id, task = %info.task_id, "restored a task");
            live.tasks
                .insert(info.task_id.clone(), LiveTask { info, held: m.held });
        }
        tracing::info!(instance = %live.attestation.instance_id, pid = live.attestation.facts.pid, svids = live.instance_svids.len(), "attested an instance and issued its SVIDs");
        Ok(live)
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
            .chain(tasks.iter().map(|t| &t.held))
            .map(|h| h.svid.clone())
            .collect();
        Arc::new(IdentitySet {
            instance_id: self.attestation.instance_id.clone(),
            pid: self.attestation.facts.pid,
            svids,
            entries: self.entries.clone(),
            tasks: tasks.into_iter().map(|t| t.info.clone()).collect(),
        })
    }

    /// True when the instance's SVIDs are for exactly `entries`, as they
    /// are defined now (an entry changed in place counts as another).
    pub(crate) fn holds_entries(&self, entries: &[Arc<Entry>]) -> bool {
        entries
            .iter()
            .map(|e| &**e)
            .eq(self.entries.iter().map(|e| &**e))
    }

    /// The serials it serves now: instance SVIDs, then tasks'.
    pub(crate) fn serials(&self) -> Vec<String> {
        self.instance_svids
            .iter()
            .chain(self.tasks.values().map(|t| &t.held))
            .map(|h| h.svid.serial.clone())
            .collect()
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
    /// is signed, stored or audited. The task, its SVID and their audit rows
    /// are one write. `now` is the monotonic clock the rate uses.
    pub(crate) async fn begin(
        &mut self,
        ctx: &Context,
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
        let ttl = req.ttl.unwrap_or(ctx.settings.task_ttl);
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
            let mut begins = ctx.begins.lock().unwrap_or_else(|p| p.into_inner());
            if begins.len() > MAX_BEGIN_BUCKETS {
                begins.retain(|_, bucket| !bucket.is_full(now));
            }
            let key = (entry.name.clone(), self.attestation.facts.uid);
            entry
                .tasks
                .take_begin(&entry.name, begins.entry(key).or_default(), now)?;
        }
        let started = SystemTime::now();
        let info = TaskInfo {
            spiffe_id: self.task_spiffe_id(&task_id)?,
            task_id,
            started_at: started,
            expires_at: started + ttl,
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
        // Signed first: an SVID that cannot be signed leaves no task behind.
        let minted = self.mint_task_svid(ctx, &info, Minted::First)?;
        let began = events::task_begin(&record, ttl);
        let minted = ctx
            .store
            .write_async(move |tx| {
                tx.insert_task(&record)?;
                tx.append_audit(&began)?;
                minted.write(tx)?;
                Ok(minted)
            })
            .await?;
        tracing::info!(instance = %self.attestation.instance_id, task = %info.task_id, %actor, "task began");
        self.tasks.insert(
            info.task_id.clone(),
            LiveTask {
                info: info.clone(),
                held: minted.held,
            },
        );
        Ok(info)
    }

    /// Ends a task: its end and the revocation of its SVIDs are one write;
    /// it leaves the streams only once that write is acknowledged.
    pub(crate) async fn end(
        &mut self,
        ctx: &Context,
        task_id: &str,
        reason: TaskEndReason,
        actor: &str,
    ) -> Result<TaskInfo, Error> {
        if !self.tasks.contains_key(task_id) {
            return Err(Error::UnknownTask(Echo::new(task_id)));
        }
        let ids = vec![task_id.to_owned()];
        self.end_tasks(ctx, ids, reason, actor).await?;
        let task = self
            .tasks
            .remove(task_id)
            .ok_or_else(|| Error::UnknownTask(Echo::new(task_id)))?;
        Ok(task.info)
    }

    /// Ends every task whose TTL has run out, in one write. Returns whether
    /// any ended.
    pub(crate) async fn expire_tasks(
        &mut self,
        ctx: &Context,
        now: SystemTime,
    ) -> Result<bool, Error> {
        let expired: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.info.expires_at <= now)
            .map(|t| t.info.task_id.clone())
            .collect();
        if expired.is_empty() {
            return Ok(false);
        }
        self.end_tasks(ctx, expired.clone(), TaskEndReason::TtlExpired, "daemon")
            .await?;
        for id in &expired {
            self.tasks.remove(id);
        }
        Ok(true)
    }

    async fn end_tasks(
        &self,
        ctx: &Context,
        task_ids: Vec<String>,
        reason: TaskEndReason,
        actor: &str,
    ) -> Result<(), Error> {
        let instance_id = self.attestation.instance_id.to_string();
        let owned_actor = actor.to_owned();
        let reason_in = reason.clone();
        let ids = task_ids.clone();
        let revoked = ctx
            .store
            .write_async(move |tx| {
                let mut revoked = Vec::new();
                for task_id in &ids {
                    revoked.extend(end_task_in(
                        tx,
                        &instance_id,
                        task_id,
                        &reason_in,
                        &owned_actor,
                    )?);
                }
                Ok(revoked)
            })
            .await?;
        for task_id in &task_ids {
            tracing::info!(instance = %self.attestation.instance_id, task = %task_id, %reason, "task ended");
        }
        ctx.revoked(RevokeReason::TaskEnded, revoked.len());
        Ok(())
    }

    /// Replaces the SVIDs that are due, after a fresh attestation, in one
    /// write (with the refreshed instance row, and the revocation of SVIDs
    /// for entries the process no longer matches or that changed, and of
    /// its tasks when its default SVID's entry changed). Returns the
    /// serials it revoked.
    pub(crate) async fn rotate_due(
        &mut self,
        ctx: &Context,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
        now: SystemTime,
    ) -> Result<Vec<String>, Error> {
        // Minted against the new facts, but kept only if the write lands:
        // a failed rotation retries from the old state, so an SVID for an
        // entry the process no longer matches is still found superseded.
        let old_attestation = std::mem::replace(&mut self.attestation, attestation);
        let old_entries = std::mem::replace(&mut self.entries, entries);
        let rotated = self.rotate_current(ctx, &old_entries, now).await;
        if rotated.is_err() {
            self.attestation = old_attestation;
            self.entries = old_entries;
        }
        rotated
    }

    /// Which instance SVIDs to keep and which to mint, for the entries in
    /// `self.entries` when the ones held were issued for `previous`. With
    /// the same entries, all are reissued once one is due; otherwise an
    /// SVID is kept only for an entry unchanged and still in the same role
    /// (default SVID or not), and not due.
    fn instance_plan(&self, previous: &[Arc<Entry>], now: SystemTime) -> Vec<Option<usize>> {
        if self
            .entries
            .iter()
            .map(|e| &**e)
            .eq(previous.iter().map(|e| &**e))
        {
            let due = self.instance_svids.iter().any(|h| h.rotate_at <= now);
            return (0..self.entries.len())
                .map(|i| (!due).then_some(i))
                .collect();
        }
        self.entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                previous.iter().enumerate().position(|(j, old)| {
                    **old == **entry
                        && (i == 0) == (j == 0)
                        && self
                            .instance_svids
                            .get(j)
                            .is_some_and(|h| h.rotate_at > now)
                })
            })
            .collect()
    }

    async fn rotate_current(
        &mut self,
        ctx: &Context,
        previous: &[Arc<Entry>],
        now: SystemTime,
    ) -> Result<Vec<String>, Error> {
        let record = instance_record(ctx, &self.attestation, &self.entries);
        let plan = self.instance_plan(previous, now);
        let mut fresh = Vec::new();
        for (i, keep) in plan.iter().enumerate() {
            if keep.is_none() {
                fresh.push((i, self.mint_instance_svid(ctx, i, Minted::Rotation)?));
            }
        }
        let superseded: Vec<String> = self
            .instance_svids
            .iter()
            .enumerate()
            .filter(|(j, _)| !plan.contains(&Some(*j)))
            .map(|(_, h)| h.svid.serial.clone())
            .collect();
        // Only a change of entries revokes (a plain rotation lets the old
        // SVIDs expire on their own).
        let entries_changed = !self
            .entries
            .iter()
            .map(|e| &**e)
            .eq(previous.iter().map(|e| &**e));
        let superseded = if entries_changed {
            superseded
        } else {
            Vec::new()
        };
        // Task IDs hang under the default SVID's ID: when its entry changes,
        // the tasks end (their SVIDs revoked) rather than live on under an
        // entry that is gone.
        let primary_changed = entries_changed && plan.first() != Some(&Some(0));
        let ended_tasks: Vec<String> = if primary_changed {
            self.tasks.keys().cloned().collect()
        } else {
            Vec::new()
        };
        let mut tasks = Vec::new();
        for task in self.tasks.values().filter(|t| t.held.rotate_at <= now) {
            if !ended_tasks.contains(&task.info.task_id) {
                tasks.push((
                    task.info.task_id.clone(),
                    self.mint_task_svid(ctx, &task.info, Minted::Rotation)?,
                ));
            }
        }
        let instance_id = record.instance_id.clone();
        let ending = ended_tasks.clone();
        let (fresh, tasks, superseded, task_serials) = ctx
            .store
            .write_async(move |tx| {
                tx.upsert_instance(&record)?;
                for m in fresh
                    .iter()
                    .map(|(_, m)| m)
                    .chain(tasks.iter().map(|(_, m)| m))
                {
                    m.write(tx)?;
                }
                if !superseded.is_empty() {
                    // The process no longer qualifies for some entry (or it
                    // changed): its SVID for that entry must not stay valid
                    // until it expires.
                    let reason = "its entries changed";
                    for serial in &superseded {
                        tx.revoke_serial(serial, SystemTime::now(), reason)?;
                    }
                    let ev = events::revocation(&instance_id, None, &superseded, reason, "daemon");
                    tx.append_audit(&ev)?;
                }
                let why = TaskEndReason::Requested {
                    by: "daemon: the entry of its instance's default SVID changed".to_owned(),
                };
                let mut task_serials = Vec::new();
                for task_id in &ending {
                    task_serials.extend(end_task_in(tx, &instance_id, task_id, &why, "daemon")?);
                }
                Ok((fresh, tasks, superseded, task_serials))
            })
            .await?;
        ctx.revoked(
            RevokeReason::EntryChanged,
            superseded.len() + task_serials.len(),
        );
        let mut held: Vec<Option<Held>> = std::mem::take(&mut self.instance_svids)
            .into_iter()
            .map(Some)
            .collect();
        let mut minted: Vec<Option<Held>> = {
            let mut slots: Vec<Option<Held>> = (0..plan.len()).map(|_| None).collect();
            for (i, m) in fresh {
                slots[i] = Some(m.held);
            }
            slots
        };
        self.instance_svids = plan
            .iter()
            .enumerate()
            .filter_map(|(i, keep)| match keep {
                Some(j) => held.get_mut(*j).and_then(Option::take),
                None => minted.get_mut(i).and_then(Option::take),
            })
            .collect();
        for task_id in &ended_tasks {
            self.tasks.remove(task_id);
        }
        for (task_id, m) in tasks {
            if let Some(task) = self.tasks.get_mut(&task_id) {
                task.held = m.held;
            }
        }
        Ok(superseded.into_iter().chain(task_serials).collect())
    }

    /// Ends the instance in one write: every task ends, every unexpired
    /// SVID is revoked, the instance ends.
    pub(crate) async fn end_all(
        &self,
        ctx: &Context,
        reason: &EndReason,
        actor: &str,
    ) -> Result<(), Error> {
        let tasks: Vec<String> = self.tasks.keys().cloned().collect();
        ctx.end_stored_instance(
            self.attestation.instance_id.as_str(),
            reason.clone(),
            tasks,
            actor,
        )
        .await
    }

    fn primary_entry(&self) -> Result<&Arc<Entry>, Error> {
        self.entries.first().ok_or(Error::InstanceEnded)
    }

    /// `<instance SPIFFE ID>/task/<task id>`.
    fn task_spiffe_id(&self, task_id: &str) -> Result<SpiffeId, Error> {
        let base = self
            .instance_svids
            .first()
            .map(|h| h.svid.spiffe_id.clone());
        task_spiffe_id(base.as_ref(), task_id)
    }

    fn mint_instance_svids(&self, ctx: &Context, minted: Minted) -> Result<Vec<Signed>, Error> {
        (0..self.entries.len())
            .map(|i| self.mint_instance_svid(ctx, i, minted))
            .collect()
    }

    /// The SVID of `self.entries[i]` (the default SVID when `i` is 0).
    fn mint_instance_svid(&self, ctx: &Context, i: usize, minted: Minted) -> Result<Signed, Error> {
        let entry = self.entries.get(i).ok_or(Error::InstanceEnded)?;
        {
            let spiffe_id = entry
                .spiffe_id_for(&ctx.trust_domain, &self.attestation)
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
                ttl: entry.ttl.unwrap_or(ctx.settings.instance_ttl),
                hint,
            };
            self.mint(ctx, &req, None, minted)
        }
    }

    fn mint_task_svid(
        &self,
        ctx: &Context,
        info: &TaskInfo,
        minted: Minted,
    ) -> Result<Signed, Error> {
        let left = info
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let covers_the_task = left <= ctx.settings.task_ttl;
        let req = SvidRequest {
            spiffe_id: info.spiffe_id.clone(),
            dns_names: Vec::new(),
            ttl: left.min(ctx.settings.task_ttl).max(Duration::from_secs(1)),
            hint: format!("task:{}", info.task_id),
        };
        let mut m = self.mint(ctx, &req, Some(&info.task_id), minted)?;
        // An SVID that lasts to the task's end is never rotated: the task
        // ends first (rotating it would mint ever shorter SVIDs).
        if covers_the_task {
            m.held.rotate_at = info.expires_at;
        }
        Ok(m)
    }

    /// Signs an SVID and prepares its row and audit row; the caller writes
    /// them, and holds the SVID only once the write is acknowledged.
    fn mint(
        &self,
        ctx: &Context,
        req: &SvidRequest,
        task_id: Option<&str>,
        minted: Minted,
    ) -> Result<Signed, Error> {
        let svid = ctx.mint.mint(req)?;
        let kind = if task_id.is_some() {
            SvidKind::Task
        } else {
            SvidKind::Instance
        };
        crate::metrics::global().svid_issued(kind);
        if minted == Minted::Rotation {
            crate::metrics::global().svid_rotated(kind);
        }
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
        let audit = events::issuance(minted, &record, &svid.hint, req.ttl);
        tracing::debug!(instance = %self.attestation.instance_id, spiffe_id = %svid.spiffe_id, serial = %svid.serial, ?minted, "signed an X509-SVID");
        Ok(Signed {
            held: Held::new(svid, ctx.jitter.next()),
            record,
            audit,
        })
    }
}

/// `<instance SPIFFE ID>/task/<task id>`.
fn task_spiffe_id(base: Option<&SpiffeId>, task_id: &str) -> Result<SpiffeId, Error> {
    let base = base.ok_or(Error::InstanceEnded)?;
    let text = format!("{base}/task/{task_id}");
    SpiffeId::new(&text).map_err(|_| TaskRefusal::BadTaskId(Echo::new(task_id)).into())
}

/// Inside a write: ends one task, revokes its unexpired SVIDs, and audits
/// both. Returns the revoked serials.
fn end_task_in(
    tx: &Tx<'_>,
    instance_id: &str,
    task_id: &str,
    reason: &TaskEndReason,
    actor: &str,
) -> Result<Vec<String>, crate::store::Error> {
    let now = SystemTime::now();
    let text = reason.to_string();
    tx.end_task(instance_id, task_id, now, reason)?;
    let serials = tx.revoke_svids(instance_id, Some(task_id), now, &text)?;
    tx.append_audit(&events::task_end(instance_id, task_id, reason, actor))?;
    if !serials.is_empty() {
        let ev = events::revocation(instance_id, Some(task_id), &serials, &text, actor);
        tx.append_audit(&ev)?;
    }
    Ok(serials)
}

/// The store's view of an attested process holding SVIDs of `entries`
/// (the default SVID's first), seen now. (The store keeps the first
/// `first_seen` of an instance and refreshes `last_seen` and `entries`.)
fn instance_record(
    ctx: &Context,
    attestation: &Attestation,
    entries: &[Arc<Entry>],
) -> InstanceRecord {
    let now = SystemTime::now();
    InstanceRecord {
        instance_id: attestation.instance_id.to_string(),
        pid: attestation.facts.pid,
        start_time: attestation.facts.start_time,
        boot_id: ctx.attestor.boot_id().to_owned(),
        uid: attestation.facts.uid,
        selectors: super::audit::selector_strings(attestation),
        first_seen: now,
        last_seen: now,
        ended_at: None,
        end_reason: None,
        entries: entries.iter().map(|e| e.name.clone()).collect(),
    }
}

impl Context {
    /// Ends an instance in the store, in one write: its live tasks end
    /// (`tasks` are the ones the caller knows; the store's own list is used
    /// when it knows none), its unexpired SVIDs are revoked, and the CRL is
    /// refreshed.
    pub(crate) async fn end_stored_instance(
        &self,
        instance_id: &str,
        reason: EndReason,
        tasks: Vec<String>,
        actor: &str,
    ) -> Result<(), Error> {
        let id = instance_id.to_owned();
        let actor = actor.to_owned();
        let reason_in = reason.clone();
        let serials = self
            .store
            .write_async(move |tx| {
                let now = SystemTime::now();
                let task_end = TaskEndReason::InstanceEnded(reason_in.clone());
                let tasks = if tasks.is_empty() {
                    tx.live_tasks(&id)?.into_iter().map(|t| t.task_id).collect()
                } else {
                    tasks
                };
                for task_id in &tasks {
                    if tx.end_task(&id, task_id, now, &task_end)? {
                        tx.append_audit(&events::task_end(&id, task_id, &task_end, &actor))?;
                    }
                }
                let serials = tx.revoke_svids(&id, None, now, &reason_in.to_string())?;
                tx.end_instance(&id, now, &reason_in)?;
                tx.append_audit(&events::instance_end(&id, &reason_in, &serials, &actor))?;
                Ok(serials)
            })
            .await?;
        tracing::info!(instance = %instance_id, %reason, revoked = serials.len(), "instance ended");
        let why = match reason {
            EndReason::Revoked { .. } => RevokeReason::Revoked,
            EndReason::NoLongerMatches { .. } => RevokeReason::EntryChanged,
            _ => RevokeReason::InstanceEnded,
        };
        self.revoked(why, serials.len());
        Ok(())
    }
}
