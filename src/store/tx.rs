//! `Tx`, the handle given to [`Store::write`](super::Store::write)
//! closures: the store's writes and reads, inside the writer's transaction
//! (in a savepoint of their own), which land only if the closure returns
//! `Ok` and the group's commit succeeds.

use std::time::{Duration, SystemTime};

use super::Error;
use super::audit::{self, AuditEvent, AuditQuery};
use super::ends::{EndReason, TaskEndReason};
use super::entries::{self, StoredEntry};
use super::records::{InstanceRecord, RevokedSvid, SvidRecord, TaskRecord};
use super::{instances, status, svids};

/// A transaction in progress; every method's effect lands with the others or
/// not at all. Given to the closures of [`Store::write`](super::Store::write).
#[derive(Debug)]
pub struct Tx<'conn> {
    pub(crate) tx: rusqlite::Transaction<'conn>,
}

impl Tx<'_> {
    /// Records a newly attested instance, or refreshes `last_seen`,
    /// `selectors` and `entries` of a known one (an ended instance stays
    /// ended).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn upsert_instance(&self, rec: &InstanceRecord) -> Result<(), Error> {
        instances::upsert_instance(&self.tx, rec)
    }

    /// Makes an ended instance live again unless it was revoked; see
    /// `instances::revive_instance`. Returns whether it was revived.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn revive_instance(&self, instance_id: &str) -> Result<bool, Error> {
        instances::revive_instance(&self.tx, instance_id)
    }

    /// Marks a live instance ended, and with it every live task of the
    /// instance (same time and reason), so no task outlives its process.
    /// Ending an unknown or already ended instance does nothing.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn end_instance(
        &self,
        instance_id: &str,
        at: SystemTime,
        reason: &EndReason,
    ) -> Result<(), Error> {
        instances::end_instance(&self.tx, instance_id, at, reason).map(drop)
    }

    /// Records a started task, so it can be ended and revoked after a restart.
    ///
    /// # Errors
    /// [`Error::TaskExists`] if the instance already has a live task with this
    /// id; [`Error::Sqlite`] otherwise (e.g. the instance is unknown).
    pub fn insert_task(&self, rec: &TaskRecord) -> Result<(), Error> {
        instances::insert_task(&self.tx, rec)
    }

    /// Marks a live task ended. Returns `false` if no such task was live.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn end_task(
        &self,
        instance_id: &str,
        task_id: &str,
        at: SystemTime,
        reason: &TaskEndReason,
    ) -> Result<bool, Error> {
        instances::end_task(&self.tx, instance_id, task_id, at, reason)
    }

    /// Records an issued SVID, so it can be revoked and put on the CRL later.
    ///
    /// # Errors
    /// [`Error::InvalidSerial`] if the serial is not lower-case hex;
    /// [`Error::Sqlite`] if it is already recorded or the instance is unknown.
    pub fn record_svid(&self, rec: &SvidRecord) -> Result<(), Error> {
        svids::record_svid(&self.tx, rec)
    }

    /// Revokes every SVID of the task (or of the whole instance, tasks
    /// included, when `task_id` is `None`) that is unexpired at `at` and not
    /// yet revoked. Returns the newly revoked serials, sorted.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn revoke_svids(
        &self,
        instance_id: &str,
        task_id: Option<&str>,
        at: SystemTime,
        reason: &str,
    ) -> Result<Vec<String>, Error> {
        svids::revoke_svids(&self.tx, instance_id, task_id, at, reason)
    }

    /// Revokes one SVID by serial (hex, any case). Returns `false` if the
    /// serial is unknown or already revoked.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn revoke_serial(&self, serial: &str, at: SystemTime, reason: &str) -> Result<bool, Error> {
        svids::revoke_serial(&self.tx, serial, at, reason)
    }

    /// Increments and returns the CRL number (the first is 1).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn next_crl_number(&self) -> Result<u64, Error> {
        svids::next_crl_number(&self.tx)
    }

    /// Deletes SVID rows that expired more than `keep` before `now`.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the delete fails.
    pub fn prune_expired_svids(&self, now: SystemTime, keep: Duration) -> Result<usize, Error> {
        svids::prune_expired_svids(&self.tx, now, keep)
    }

    /// Appends an audit event (its `seq` and `hash` are ignored) and
    /// returns its sequence number. The store chains its hash to the
    /// previous row's (see [`Store::verify_audit`](super::Store::verify_audit)).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn append_audit(&self, event: &AuditEvent) -> Result<i64, Error> {
        audit::append(&self.tx, event)
    }

    /// Stores a registration entry created over the admin API.
    ///
    /// # Errors
    /// [`Error::EntryExists`] if an entry of that name is stored already;
    /// [`Error::Sqlite`] if the write fails.
    pub fn insert_entry(&self, entry: &StoredEntry) -> Result<(), Error> {
        entries::insert_entry(&self.tx, entry)
    }

    /// Deletes a stored registration entry. Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn delete_entry(&self, name: &str) -> Result<bool, Error> {
        entries::delete_entry(&self.tx, name)
    }

    /// The readiness probe's write: records `now` in the one-row health
    /// table, then checks that the store still has room to record
    /// identities (see `status.rs`).
    ///
    /// # Errors
    /// [`Error::StoreFull`] when the page cap or the disk leaves too little
    /// room; [`Error::Sqlite`] if the write fails. Either way nothing of
    /// this transaction lands.
    pub fn touch_health(&self, now: SystemTime) -> Result<(), Error> {
        status::touch_health(&self.tx, now)
    }

    /// How this instance ended, if it ended in a way that refuses its
    /// process for as long as it runs (a revocation): checked inside the
    /// transaction that would record new SVIDs for it, so a revocation
    /// that lands first always wins.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn sticky_end(&self, instance_id: &str) -> Result<Option<EndReason>, Error> {
        Ok(instances::instance(&self.tx, instance_id)?
            .and_then(|r| r.end_reason)
            .filter(EndReason::is_sticky))
    }

    /// One instance, live or ended, as this transaction sees it.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>, Error> {
        instances::instance(&self.tx, instance_id)
    }

    /// The live tasks of one instance, as this transaction sees them.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn live_tasks(&self, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
        instances::live_tasks(&self.tx, Some(instance_id))
    }

    /// One SVID by serial, as this transaction sees it.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, Error> {
        svids::svid(&self.tx, serial)
    }

    /// The CRL entries at `now`, as this transaction sees them (e.g. right
    /// after revoking, to build the CRL with the number taken in the same
    /// transaction).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn revoked_unexpired(&self, now: SystemTime) -> Result<Vec<RevokedSvid>, Error> {
        svids::revoked_unexpired(&self.tx, now)
    }

    /// Audit events matching `query`, as this transaction sees them.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        audit::query(&self.tx, query)
    }
}
