//! The rows the store keeps about instances, tasks and SVIDs, and their mapping
//! to and from SQLite rows (timestamps as unix milliseconds, lists and maps as
//! JSON text). The SQL that reads and writes them lives in `instances.rs` and
//! `svids.rs`; the audit trail has its own types in `audit.rs`, stored
//! registration entries in `entries.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Type;
use rusqlite::{Connection, ErrorCode, Row};
use serde::de::DeserializeOwned;

use super::ends::end_columns;
pub use super::ends::{EndReason, TaskEndReason};

/// An attested process as remembered across restarts, so a restarted daemon
/// knows which instances were live and can revoke their SVIDs.
///
/// Timestamps are stored to the millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// The instance id derived at attestation (path-safe).
    pub instance_id: String,
    /// The process id at attestation.
    pub pid: u32,
    /// The process start time (clock ticks since boot), which tells pid reuse apart.
    pub start_time: u64,
    /// The kernel boot id the start time is relative to.
    pub boot_id: String,
    /// The process's uid at attestation.
    pub uid: u32,
    /// The attested selectors, `type:key:value`.
    pub selectors: Vec<String>,
    /// When the instance was first attested.
    pub first_seen: SystemTime,
    /// When the instance was last (re-)attested.
    pub last_seen: SystemTime,
    /// When the instance ended; `None` while it is live.
    pub ended_at: Option<SystemTime>,
    /// Why the instance ended (process exit, revocation, ...).
    pub end_reason: Option<EndReason>,
    /// The names of the registration entries whose SVIDs the instance
    /// holds, the default SVID's first. Rotation can change them; the
    /// store keeps the latest.
    pub entries: Vec<String>,
}

/// A task run by an instance, kept so its SVIDs can be revoked when it ends,
/// even across a daemon restart.
///
/// Timestamps are stored to the millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The instance the task belongs to.
    pub instance_id: String,
    /// The task id, unique among the instance's live tasks.
    pub task_id: String,
    /// The SPIFFE ID the task's SVIDs carry.
    pub spiffe_id: String,
    /// When the task started.
    pub started_at: SystemTime,
    /// When the task ends on its own (TTL).
    pub expires_at: SystemTime,
    /// Caller-supplied attributes, kept for the audit trail and listings.
    pub attributes: BTreeMap<String, String>,
    /// Who started the task (e.g. `pid:123 uid:1000`, `admin uid:0`).
    pub started_by: String,
    /// When the task ended; `None` while it is live.
    pub ended_at: Option<SystemTime>,
    /// Why the task ended (ended by caller, expired, instance ended, ...).
    pub end_reason: Option<TaskEndReason>,
}

/// An issued X.509-SVID, kept so it can be revoked and listed on the CRL.
///
/// Timestamps are stored to the millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidRecord {
    /// The certificate serial number, lower-case hex without separators.
    pub serial: String,
    /// The SPIFFE ID in the certificate's URI SAN.
    pub spiffe_id: String,
    /// The instance the SVID was issued to.
    pub instance_id: String,
    /// The task the SVID was issued for; `None` for the instance's own SVID.
    pub task_id: Option<String>,
    /// The certificate's notBefore.
    pub not_before: SystemTime,
    /// The certificate's notAfter; once past, the SVID leaves the CRL.
    pub not_after: SystemTime,
    /// When the SVID was revoked; `None` if it was not.
    pub revoked_at: Option<SystemTime>,
    /// Why the SVID was revoked.
    pub revoke_reason: Option<String>,
}

/// One CRL entry: a revoked SVID that has not yet expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSvid {
    /// The certificate serial number, lower-case hex.
    pub serial: String,
    /// The CRL entry's revocationDate.
    pub revoked_at: SystemTime,
    /// The certificate's notAfter, after which the entry can leave the CRL.
    pub not_after: SystemTime,
}

/// Columns of `instances`, in the order [`instance_from_row`] reads them.
pub(crate) const INSTANCE_COLUMNS: &str = "instance_id, pid, start_time, boot_id, uid, selectors, \
     first_seen_ms, last_seen_ms, ended_at_ms, end_kind, end_reason, entries";

/// Columns of `tasks`, in the order [`task_from_row`] reads them.
pub(crate) const TASK_COLUMNS: &str = "instance_id, task_id, spiffe_id, started_at_ms, \
     expires_at_ms, attributes, started_by, ended_at_ms, end_kind, end_reason";

/// Columns of `svids`, in the order [`svid_from_row`] reads them.
pub(crate) const SVID_COLUMNS: &str = "serial, spiffe_id, instance_id, task_id, not_before_ms, \
     not_after_ms, revoked_at_ms, revoke_reason";

/// Reads an [`InstanceRecord`] from a row selected with [`INSTANCE_COLUMNS`].
pub(crate) fn instance_from_row(row: &Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        instance_id: row.get(0)?,
        pid: row.get(1)?,
        start_time: row.get(2)?,
        boot_id: row.get(3)?,
        uid: row.get(4)?,
        selectors: json_column(row, 5)?,
        first_seen: time_column(row, 6)?,
        last_seen: time_column(row, 7)?,
        ended_at: opt_time_column(row, 8)?,
        end_reason: end_columns(row, 9, 10, EndReason::from_columns)?,
        entries: json_column(row, 11)?,
    })
}

/// Reads a [`TaskRecord`] from a row selected with [`TASK_COLUMNS`].
pub(crate) fn task_from_row(row: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    Ok(TaskRecord {
        instance_id: row.get(0)?,
        task_id: row.get(1)?,
        spiffe_id: row.get(2)?,
        started_at: time_column(row, 3)?,
        expires_at: time_column(row, 4)?,
        attributes: json_column(row, 5)?,
        started_by: row.get(6)?,
        ended_at: opt_time_column(row, 7)?,
        end_reason: end_columns(row, 8, 9, TaskEndReason::from_columns)?,
    })
}

/// Reads an [`SvidRecord`] from a row selected with [`SVID_COLUMNS`].
pub(crate) fn svid_from_row(row: &Row<'_>) -> rusqlite::Result<SvidRecord> {
    Ok(SvidRecord {
        serial: row.get(0)?,
        spiffe_id: row.get(1)?,
        instance_id: row.get(2)?,
        task_id: row.get(3)?,
        not_before: time_column(row, 4)?,
        not_after: time_column(row, 5)?,
        revoked_at: opt_time_column(row, 6)?,
        revoke_reason: row.get(7)?,
    })
}

/// Converts a time to unix milliseconds, the store's time column format.
/// Times before 1970 become negative; times beyond `i64` milliseconds saturate.
pub(crate) fn to_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Converts unix milliseconds back to a time; the inverse of [`to_ms`].
pub(crate) fn from_ms(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    let at = if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    at.unwrap_or(UNIX_EPOCH)
}

/// Converts an optional time to an optional millisecond column value.
pub(crate) fn opt_ms(at: Option<SystemTime>) -> Option<i64> {
    at.map(to_ms)
}

fn time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<SystemTime> {
    row.get::<_, i64>(idx).map(from_ms)
}

fn opt_time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<SystemTime>> {
    Ok(row.get::<_, Option<i64>>(idx)?.map(from_ms))
}

/// Reads a JSON text column into `T`, reporting bad JSON as a conversion failure.
pub(crate) fn json_column<T: DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

/// Encodes a value as JSON text for a column.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Vec<String>, BTreeMap<String, String> and serde_json::Value cannot fail
    // to serialize; fall back to JSON null rather than panic.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// Whether `e` is a UNIQUE or PRIMARY KEY constraint failure: a row that
/// already exists (a duplicate live task, a taken entry name).
pub(crate) fn is_duplicate(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == ErrorCode::ConstraintViolation
                && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

/// Runs a query (or a `RETURNING` statement) and maps every row.
pub(crate) fn collect<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, map)?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millisecond_times_round_trip_exactly() {
        for ms in [0_i64, 1, 1_700_000_000_123, -1, -86_400_000] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
    }

    #[test]
    fn sub_millisecond_precision_is_truncated() {
        let at = UNIX_EPOCH + Duration::from_micros(1_500);
        assert_eq!(to_ms(at), 1);
    }

    #[test]
    fn times_before_the_epoch_are_negative() {
        let at = UNIX_EPOCH - Duration::from_millis(250);
        assert_eq!(to_ms(at), -250);
        assert_eq!(from_ms(-250), at);
    }

    #[test]
    fn string_lists_and_maps_encode_as_json() {
        assert_eq!(
            to_json(&vec!["unix:uid:1000".to_owned()]),
            r#"["unix:uid:1000"]"#
        );
        let map = BTreeMap::from([("a".to_owned(), "b".to_owned())]);
        assert_eq!(to_json(&map), r#"{"a":"b"}"#);
    }
}
