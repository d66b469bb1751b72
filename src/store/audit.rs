//! The append-only audit trail: the event types, their kinds, the query
//! filter, and the SQL that appends and reads events. Append-only is enforced
//! by triggers in `schema.rs`, not only by this API offering no update.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use rusqlite::types::{ToSql, Type};
use rusqlite::{Connection, Row, params};

use super::records::{from_ms, json_column, to_json, to_ms};
use super::{Error, sqlite};

/// What an audit event records; stored as lower-case snake_case text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A process was attested and matched an entry.
    Attestation,
    /// A process was refused an identity.
    Refusal,
    /// An SVID was minted for the first time for an instance or task.
    Issuance,
    /// An SVID was replaced before it expired.
    Rotation,
    /// A task started.
    TaskBegin,
    /// A task ended (by its caller, TTL or instance end).
    TaskEnd,
    /// SVIDs were revoked.
    Revocation,
    /// An instance ended (process exit or admin action).
    InstanceEnd,
    /// An admin API call.
    Admin,
}

impl AuditKind {
    /// Every kind, for listings and round-trip tests.
    pub const ALL: [AuditKind; 9] = [
        AuditKind::Attestation,
        AuditKind::Refusal,
        AuditKind::Issuance,
        AuditKind::Rotation,
        AuditKind::TaskBegin,
        AuditKind::TaskEnd,
        AuditKind::Revocation,
        AuditKind::InstanceEnd,
        AuditKind::Admin,
    ];

    /// Every kind's name, comma-separated, for messages.
    pub fn names() -> String {
        AuditKind::ALL.map(AuditKind::as_str).join(", ")
    }

    /// The stored and displayed name, e.g. `task_begin`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Attestation => "attestation",
            AuditKind::Refusal => "refusal",
            AuditKind::Issuance => "issuance",
            AuditKind::Rotation => "rotation",
            AuditKind::TaskBegin => "task_begin",
            AuditKind::TaskEnd => "task_end",
            AuditKind::Revocation => "revocation",
            AuditKind::InstanceEnd => "instance_end",
            AuditKind::Admin => "admin",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditKind {
    type Err = Error;

    /// Parses a stored or user-typed kind name (`task_begin`, `admin`, ...).
    fn from_str(s: &str) -> Result<Self, Error> {
        AuditKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| Error::UnknownAuditKind { kind: s.to_owned() })
    }
}

/// One entry of the audit trail: who did what to which identity, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// The event's sequence number, assigned by the store; ignored (use 0)
    /// when appending.
    pub seq: i64,
    /// When it happened (kept to the millisecond).
    pub at: SystemTime,
    /// What happened.
    pub kind: AuditKind,
    /// Who caused it, e.g. `pid:123 uid:1000`, `admin uid:0`, `daemon`.
    pub actor: String,
    /// The instance concerned, if any.
    pub instance_id: Option<String>,
    /// The task concerned, if any.
    pub task_id: Option<String>,
    /// The SPIFFE ID concerned, if any.
    pub spiffe_id: Option<String>,
    /// The SVID serial concerned (lower-case hex), if any.
    pub serial: Option<String>,
    /// Kind-specific facts: selectors, reasons, entry names, ...
    pub detail: serde_json::Value,
}

/// Which audit events to read; every filter is optional and they combine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only events about this instance.
    pub instance_id: Option<String>,
    /// Only events of this kind.
    pub kind: Option<AuditKind>,
    /// Only events with `seq` strictly greater than this (resume after the
    /// last event seen). With it, `limit` keeps the oldest matching events.
    pub since_seq: Option<i64>,
    /// At most this many events. Without `since_seq` these are the newest.
    pub limit: Option<usize>,
}

const AUDIT_COLUMNS: &str =
    "seq, at_ms, kind, actor, instance_id, task_id, spiffe_id, serial, detail";

/// Appends an event and returns its sequence number.
pub(crate) fn append(conn: &Connection, event: &AuditEvent) -> Result<i64, Error> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, kind, actor, instance_id, task_id, spiffe_id, serial, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut stmt| {
        stmt.insert(params![
            to_ms(event.at),
            event.kind.as_str(),
            event.actor,
            event.instance_id,
            event.task_id,
            event.spiffe_id,
            event.serial,
            to_json(&event.detail),
        ])
    })
    .map_err(sqlite("append audit event"))
}

/// Reads the events matching `query`, oldest first.
pub(crate) fn query(conn: &Connection, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
    let mut filters = Vec::new();
    let mut values: Vec<Box<dyn ToSql>> = Vec::new();
    if let Some(instance_id) = &query.instance_id {
        values.push(Box::new(instance_id.clone()));
        filters.push(format!("instance_id = ?{}", values.len()));
    }
    if let Some(kind) = query.kind {
        values.push(Box::new(kind.as_str()));
        filters.push(format!("kind = ?{}", values.len()));
    }
    if let Some(since) = query.since_seq {
        values.push(Box::new(since));
        filters.push(format!("seq > ?{}", values.len()));
    }
    let filter = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    // Resuming after a seq pages forwards; otherwise show the newest events.
    let newest_first = query.since_seq.is_none() && query.limit.is_some();
    let order = if newest_first { "DESC" } else { "ASC" };
    let limit = query
        .limit
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let sql =
        format!("SELECT {AUDIT_COLUMNS} FROM audit {filter} ORDER BY seq {order} LIMIT {limit}");
    let params: Vec<&dyn ToSql> = values.iter().map(|v| v.as_ref()).collect();
    let mut events = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params.as_slice(), event_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sqlite("query audit events"))?;
    if newest_first {
        events.reverse();
    }
    Ok(events)
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<AuditEvent> {
    let kind: String = row.get(2)?;
    let kind = kind
        .parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, Box::new(e)))?;
    Ok(AuditEvent {
        seq: row.get(0)?,
        at: from_ms(row.get(1)?),
        kind,
        actor: row.get(3)?,
        instance_id: row.get(4)?,
        task_id: row.get(5)?,
        spiffe_id: row.get(6)?,
        serial: row.get(7)?,
        detail: json_column(row, 8)?,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::store::Store;
    use crate::store::fixtures::TestStore;

    fn event(kind: AuditKind, instance: &str, ms: u64) -> AuditEvent {
        AuditEvent {
            seq: 0,
            at: UNIX_EPOCH + Duration::from_millis(ms),
            kind,
            actor: "pid:123 uid:1000".to_owned(),
            instance_id: Some(instance.to_owned()),
            task_id: None,
            spiffe_id: Some("spiffe://example.org/agent".to_owned()),
            serial: Some("0a1b".to_owned()),
            detail: json!({"selectors": ["unix:uid:1000"]}),
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in AuditKind::ALL {
            assert_eq!(kind.to_string().parse::<AuditKind>().unwrap(), kind);
        }
        assert_eq!(AuditKind::TaskBegin.to_string(), "task_begin");
        assert!("TaskBegin".parse::<AuditKind>().is_err());
    }

    #[test]
    fn serde_names_match_the_stored_names() {
        for kind in AuditKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
    }

    #[test]
    fn an_appended_event_reads_back_with_its_sequence_number() {
        let (_dir, store) = store();
        let seq = store
            .append_audit(&event(AuditKind::Attestation, "i1", 1_000))
            .unwrap();
        let events = store.audit(&AuditQuery::default()).unwrap();
        let expected = AuditEvent {
            seq,
            ..event(AuditKind::Attestation, "i1", 1_000)
        };
        assert_eq!(events, vec![expected]);
    }

    #[test]
    fn sequence_numbers_increase() {
        let (_dir, store) = store();
        let seqs: Vec<i64> = (0..5)
            .map(|i| {
                store
                    .append_audit(&event(AuditKind::Admin, "i1", i))
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }

    #[test]
    fn filters_select_by_instance_kind_and_sequence() {
        let (_dir, store) = store();
        let a = store
            .append_audit(&event(AuditKind::Attestation, "i1", 1))
            .unwrap();
        let b = store
            .append_audit(&event(AuditKind::Issuance, "i1", 2))
            .unwrap();
        let c = store
            .append_audit(&event(AuditKind::Issuance, "i2", 3))
            .unwrap();
        let seqs = |q: AuditQuery| -> Vec<i64> {
            store.audit(&q).unwrap().iter().map(|e| e.seq).collect()
        };
        let by_instance = AuditQuery {
            instance_id: Some("i1".to_owned()),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(by_instance), vec![a, b]);
        let by_kind = AuditQuery {
            kind: Some(AuditKind::Issuance),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(by_kind), vec![b, c]);
        let since = AuditQuery {
            since_seq: Some(a),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(since), vec![b, c]);
        let both = AuditQuery {
            instance_id: Some("i2".to_owned()),
            kind: Some(AuditKind::Issuance),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(both), vec![c]);
    }

    #[test]
    fn a_limit_keeps_the_newest_events_oldest_first() {
        let (_dir, store) = store();
        let seqs: Vec<i64> = (0..5)
            .map(|i| {
                store
                    .append_audit(&event(AuditKind::Admin, "i1", i))
                    .unwrap()
            })
            .collect();
        let q = AuditQuery {
            limit: Some(2),
            ..AuditQuery::default()
        };
        let got: Vec<i64> = store.audit(&q).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(got, seqs[3..].to_vec());
    }

    #[test]
    fn a_limit_after_a_sequence_number_pages_forwards() {
        let (_dir, store) = store();
        let seqs: Vec<i64> = (0..5)
            .map(|i| {
                store
                    .append_audit(&event(AuditKind::Admin, "i1", i))
                    .unwrap()
            })
            .collect();
        let q = AuditQuery {
            since_seq: Some(seqs[0]),
            limit: Some(2),
            ..AuditQuery::default()
        };
        let got: Vec<i64> = store.audit(&q).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(got, seqs[1..3].to_vec());
    }

    #[test]
    fn audit_rows_cannot_be_updated_or_deleted_through_sql() {
        let (dir, store) = store();
        store
            .append_audit(&event(AuditKind::Admin, "i1", 1))
            .unwrap();
        drop(store);
        let conn = Connection::open(dir.path().join("sigil.db")).unwrap();
        let update = conn.execute("UPDATE audit SET actor = 'someone else'", []);
        assert!(update.unwrap_err().to_string().contains("append-only"));
        let delete = conn.execute("DELETE FROM audit", []);
        assert!(delete.unwrap_err().to_string().contains("append-only"));
        let count: i64 = conn
            .query_row("SELECT count(*) FROM audit", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 1);
    }

    #[test]
    fn an_unknown_kind_is_refused_by_the_table() {
        let (dir, store) = store();
        drop(store);
        let conn = Connection::open(dir.path().join("sigil.db")).unwrap();
        let insert = conn.execute(
            "INSERT INTO audit (at_ms, kind, actor, detail) VALUES (0, 'bogus', 'x', 'null')",
            [],
        );
        assert!(insert.is_err());
    }
}
