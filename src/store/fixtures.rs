//! Test fixtures shared by the store's test modules: a store in a temp
//! directory, fixed times, and records with sensible defaults.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    AuditEvent, EndReason, Error, InstanceRecord, Store, SvidRecord, TaskEndReason, TaskRecord,
};

/// A store in a fresh temp directory; keep the directory alive with it.
pub(crate) fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// A whole-second time `secs` after a fixed base, exact at millisecond precision.
pub(crate) fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

pub(crate) fn instance(id: &str) -> InstanceRecord {
    InstanceRecord {
        instance_id: id.to_owned(),
        pid: 4242,
        start_time: 987_654_321,
        boot_id: "6f1d2c3e-boot".to_owned(),
        uid: 1000,
        selectors: vec![
            "unix:uid:1000".to_owned(),
            "unix:path:/usr/bin/agent".to_owned(),
        ],
        first_seen: t(0),
        last_seen: t(0),
        ended_at: None,
        end_reason: None,
        entries: vec!["agent".to_owned()],
    }
}

pub(crate) fn task(instance_id: &str, task_id: &str) -> TaskRecord {
    TaskRecord {
        instance_id: instance_id.to_owned(),
        task_id: task_id.to_owned(),
        spiffe_id: format!("spiffe://example.org/agent/{task_id}"),
        started_at: t(10),
        expires_at: t(310),
        attributes: BTreeMap::from([("ticket".to_owned(), "OPS-1".to_owned())]),
        started_by: "pid:4242 uid:1000".to_owned(),
        ended_at: None,
        end_reason: None,
    }
}

/// An SVID valid from t(0) until `not_after`.
pub(crate) fn svid(
    serial: &str,
    instance_id: &str,
    task_id: Option<&str>,
    not_after: SystemTime,
) -> SvidRecord {
    SvidRecord {
        serial: serial.to_owned(),
        spiffe_id: "spiffe://example.org/agent".to_owned(),
        instance_id: instance_id.to_owned(),
        task_id: task_id.map(str::to_owned),
        not_before: t(0),
        not_after,
        revoked_at: None,
        revoke_reason: None,
    }
}

/// One-statement writes and test-only reads, each its own committed write
/// through the writer thread, as the daemon's writes are.
pub(crate) trait TestStore {
    fn upsert_instance(&self, rec: &InstanceRecord) -> Result<(), Error>;
    fn end_instance(&self, id: &str, at: SystemTime, reason: EndReason) -> Result<(), Error>;
    fn insert_task(&self, rec: &TaskRecord) -> Result<(), Error>;
    fn end_task(&self, id: &str, task: &str, at: SystemTime) -> Result<bool, Error>;
    fn record_svid(&self, rec: &SvidRecord) -> Result<(), Error>;
    fn revoke_svids(
        &self,
        id: &str,
        task: Option<&str>,
        at: SystemTime,
        reason: &str,
    ) -> Result<Vec<String>, Error>;
    fn revoke_serial(&self, serial: &str, at: SystemTime, reason: &str) -> Result<bool, Error>;
    fn next_crl_number(&self) -> Result<u64, Error>;
    fn prune_expired_svids(&self, now: SystemTime, keep: Duration) -> Result<usize, Error>;
    fn append_audit(&self, event: &AuditEvent) -> Result<i64, Error>;
}

/// The reason `TestStore::end_task` records.
pub(crate) fn done() -> TaskEndReason {
    TaskEndReason::Requested {
        by: "done".to_owned(),
    }
}

impl TestStore for Store {
    fn upsert_instance(&self, rec: &InstanceRecord) -> Result<(), Error> {
        let rec = rec.clone();
        self.write(move |tx| tx.upsert_instance(&rec))
    }
    fn end_instance(&self, id: &str, at: SystemTime, reason: EndReason) -> Result<(), Error> {
        let id = id.to_owned();
        self.write(move |tx| tx.end_instance(&id, at, &reason))
    }
    fn insert_task(&self, rec: &TaskRecord) -> Result<(), Error> {
        let rec = rec.clone();
        self.write(move |tx| tx.insert_task(&rec))
    }
    fn end_task(&self, id: &str, task: &str, at: SystemTime) -> Result<bool, Error> {
        let (id, task) = (id.to_owned(), task.to_owned());
        self.write(move |tx| tx.end_task(&id, &task, at, &done()))
    }
    fn record_svid(&self, rec: &SvidRecord) -> Result<(), Error> {
        let rec = rec.clone();
        self.write(move |tx| tx.record_svid(&rec))
    }
    fn revoke_svids(
        &self,
        id: &str,
        task: Option<&str>,
        at: SystemTime,
        reason: &str,
    ) -> Result<Vec<String>, Error> {
        let (id, task, reason) = (id.to_owned(), task.map(str::to_owned), reason.to_owned());
        self.write(move |tx| tx.revoke_svids(&id, task.as_deref(), at, &reason))
    }
    fn revoke_serial(&self, serial: &str, at: SystemTime, reason: &str) -> Result<bool, Error> {
        let (serial, reason) = (serial.to_owned(), reason.to_owned());
        self.write(move |tx| tx.revoke_serial(&serial, at, &reason))
    }
    fn next_crl_number(&self) -> Result<u64, Error> {
        self.write(|tx| tx.next_crl_number())
    }
    fn prune_expired_svids(&self, now: SystemTime, keep: Duration) -> Result<usize, Error> {
        self.write(move |tx| tx.prune_expired_svids(now, keep))
    }
    fn append_audit(&self, event: &AuditEvent) -> Result<i64, Error> {
        let event = event.clone();
        self.write(move |tx| tx.append_audit(&event))
    }
}
