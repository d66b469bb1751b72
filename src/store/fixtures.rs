//! Test fixtures shared by the store's test modules: a store in a temp
//! directory, fixed times, and records with sensible defaults.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{InstanceRecord, Store, SvidRecord, TaskRecord};

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
