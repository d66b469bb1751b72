//! The append-only audit trail: the event types, their kinds, the query
//! filter, and the SQL that appends and reads events. Append-only is enforced
//! by triggers in `schema.rs`, not only by this API offering no update; each
//! row's hash (the rule is in `chain.rs`) makes a change made anyway visible.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use rusqlite::types::{ToSql, Type};
use rusqlite::{Connection, Row, params};

use super::chain::{Link, previous_of};
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
    /// The row's link in the audit hash chain (lower-case hex SHA-256), as
    /// stored; `None` when appending (the store computes it and ignores
    /// this) and for a row that lost its hash.
    pub hash: Option<String>,
}

/// Which audit events to read; every filter is optional and they combine.
/// Events come oldest first (ascending `seq`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only events about this instance.
    pub instance_id: Option<String>,
    /// Only events about this task (of any instance; combine with
    /// `instance_id` for one instance's task).
    pub task_id: Option<String>,
    /// Only events of this kind.
    pub kind: Option<AuditKind>,
    /// Only events that happened at or after this time (to the millisecond).
    pub since: Option<SystemTime>,
    /// Only events with `seq` strictly greater than this: resume after the
    /// last event seen.
    pub after_seq: Option<i64>,
    /// At most this many events: the oldest matching ones, so that paging
    /// with `after_seq` set to the last `seq` read misses nothing.
    pub limit: Option<usize>,
}

const AUDIT_COLUMNS: &str =
    "seq, at_ms, kind, actor, instance_id, task_id, spiffe_id, serial, detail, hash";

/// The newest sequence number ever given (deleted rows included, as
/// AUTOINCREMENT remembers them) and the newest row's stored hash.
const CHAIN_TAIL: &str = "SELECT max(
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0),
        coalesce((SELECT max(seq) FROM audit), 0)),
    (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1)";

/// Appends an event (its `seq` and `hash` are ignored) and returns its
/// sequence number. Its hash chains to the newest row's, read in the same
/// transaction: the store's one writer makes that row the one before it,
/// and a job rolled back to its savepoint takes its rows with it.
pub(crate) fn append(conn: &Connection, event: &AuditEvent) -> Result<i64, Error> {
    let (last_seq, previous): (i64, Option<String>) = conn
        .prepare_cached(CHAIN_TAIL)
        .and_then(|mut stmt| stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
        .map_err(sqlite("read the audit chain's newest row"))?;
    let seq = last_seq + 1;
    let at_ms = to_ms(event.at);
    let detail = to_json(&event.detail);
    let link = Link {
        seq,
        at_ms,
        kind: event.kind.as_str(),
        actor: &event.actor,
        instance_id: event.instance_id.as_deref(),
        task_id: event.task_id.as_deref(),
        spiffe_id: event.spiffe_id.as_deref(),
        serial: event.serial.as_deref(),
        detail: &detail,
    };
    let hash = link.hash_hex(&previous_of(previous.as_deref()));
    conn.prepare_cached(
        "INSERT INTO audit (seq, at_ms, kind, actor, instance_id, task_id, spiffe_id, serial,
             detail, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            seq,
            at_ms,
            link.kind,
            link.actor,
            link.instance_id,
            link.task_id,
            link.spiffe_id,
            link.serial,
            detail,
            hash,
        ])
    })
    .map_err(sqlite("append audit event"))?;
    Ok(seq)
}

/// Reads the events matching `query`, oldest first.
pub(crate) fn query(conn: &Connection, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
    let mut filters = Vec::new();
    let mut values: Vec<Box<dyn ToSql>> = Vec::new();
    let mut filter = |sql: &str, value: Box<dyn ToSql>| {
        values.push(value);
        filters.push(format!("{sql} ?{}", values.len()));
    };
    if let Some(instance_id) = &query.instance_id {
        filter("instance_id =", Box::new(instance_id.clone()));
    }
    if let Some(task_id) = &query.task_id {
        filter("task_id =", Box::new(task_id.clone()));
    }
    if let Some(kind) = query.kind {
        filter("kind =", Box::new(kind.as_str()));
    }
    if let Some(since) = query.since {
        filter("at_ms >=", Box::new(to_ms(since)));
    }
    if let Some(after) = query.after_seq {
        filter("seq >", Box::new(after));
    }
    let filter = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let limit = query
        .limit
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit {filter} ORDER BY seq LIMIT {limit}");
    let params: Vec<&dyn ToSql> = values.iter().map(|v| v.as_ref()).collect();
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params.as_slice(), event_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sqlite("query audit events"))
}

/// When the newest rotation happened, if any (searched by the
/// `audit_by_kind` index; a test checks the plan).
pub(crate) const LAST_ROTATION: &str =
    "SELECT at_ms FROM audit WHERE kind = 'rotation' ORDER BY seq DESC LIMIT 1";

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
        hash: row.get(9)?,
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
            hash: None,
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
        let head = store.verify_audit().unwrap().head;
        assert_eq!(head.as_ref().map(String::len), Some(64), "{head:?}");
        let expected = AuditEvent {
            seq,
            hash: head,
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
        let after = AuditQuery {
            after_seq: Some(a),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(after), vec![b, c]);
        let both = AuditQuery {
            instance_id: Some("i2".to_owned()),
            kind: Some(AuditKind::Issuance),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(both), vec![c]);
    }

    #[test]
    fn a_limit_keeps_the_oldest_matching_events() {
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
        assert_eq!(got, seqs[..2].to_vec());
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
            after_seq: Some(seqs[0]),
            limit: Some(2),
            ..AuditQuery::default()
        };
        let got: Vec<i64> = store.audit(&q).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(got, seqs[1..3].to_vec());
    }

    #[test]
    fn filters_select_by_task_and_by_time_at_or_after() {
        let (_dir, store) = store();
        let in_task = |task: &str, ms| AuditEvent {
            task_id: Some(task.to_owned()),
            ..event(AuditKind::TaskBegin, "i1", ms)
        };
        let a = store.append_audit(&in_task("t1", 1_000)).unwrap();
        let b = store.append_audit(&in_task("t2", 2_000)).unwrap();
        let c = store.append_audit(&in_task("t1", 3_000)).unwrap();
        let d = store
            .append_audit(&event(AuditKind::Admin, "i1", 2_000))
            .unwrap();
        let seqs = |q: AuditQuery| -> Vec<i64> {
            store.audit(&q).unwrap().iter().map(|e| e.seq).collect()
        };
        let by_task = AuditQuery {
            task_id: Some("t1".to_owned()),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(by_task), vec![a, c]);
        let since = AuditQuery {
            since: Some(UNIX_EPOCH + Duration::from_millis(2_000)),
            ..AuditQuery::default()
        };
        assert_eq!(seqs(since), vec![b, c, d]);
        let both = AuditQuery {
            task_id: Some("t2".to_owned()),
            since: Some(UNIX_EPOCH + Duration::from_millis(2_001)),
            ..AuditQuery::default()
        };
        assert!(seqs(both).is_empty());
    }

    #[test]
    fn the_newest_rotation_is_found_through_the_kind_index() {
        let (dir, store) = store();
        drop(store);
        let conn = Connection::open(dir.path().join("sigil.db")).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {LAST_ROTATION}"))
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("; ");
        assert!(plan.contains("audit_by_kind (kind=?)"), "{plan}");
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
