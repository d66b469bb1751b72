//! The SQL for instances and their tasks, as plain functions over a
//! `rusqlite::Connection`. `Store` and `Tx` both call these, so a write
//! behaves the same alone or inside a caller's transaction. SVIDs and the CRL
//! number are in `svids.rs`; the record types in `records.rs`.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::ends::{EndReason, TaskEndReason};
use super::records::{
    INSTANCE_COLUMNS, InstanceRecord, TASK_COLUMNS, TaskRecord, collect, instance_from_row,
    is_duplicate, opt_ms, task_from_row, to_json, to_ms,
};
use super::{Error, sqlite};

/// Inserts an instance, or refreshes `last_seen`, `selectors` and `entries`
/// of a known one. An ended instance stays ended.
pub(crate) fn upsert_instance(conn: &Connection, rec: &InstanceRecord) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO instances (instance_id, pid, start_time, boot_id, uid, selectors,
             first_seen_ms, last_seen_ms, ended_at_ms, end_kind, end_reason, entries)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (instance_id) DO UPDATE SET
             last_seen_ms = excluded.last_seen_ms, selectors = excluded.selectors,
             entries = excluded.entries",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            rec.instance_id,
            rec.pid,
            rec.start_time,
            rec.boot_id,
            rec.uid,
            to_json(&rec.selectors),
            to_ms(rec.first_seen),
            to_ms(rec.last_seen),
            opt_ms(rec.ended_at),
            rec.end_reason.as_ref().map(EndReason::kind),
            rec.end_reason.as_ref().map(EndReason::detail),
            to_json(&rec.entries),
        ])
    })
    .map(drop)
    .map_err(sqlite("upsert instance"))
}

/// Marks a live instance and its live tasks as ended. Returns whether the
/// instance was live.
pub(crate) fn end_instance(
    conn: &Connection,
    instance_id: &str,
    at: SystemTime,
    reason: &EndReason,
) -> Result<bool, Error> {
    let changed = conn
        .execute(
            "UPDATE instances SET ended_at_ms = ?2, end_kind = ?3, end_reason = ?4
             WHERE instance_id = ?1 AND ended_at_ms IS NULL",
            params![instance_id, to_ms(at), reason.kind(), reason.detail()],
        )
        .map_err(sqlite("end instance"))?;
    let task_end = TaskEndReason::InstanceEnded(reason.clone());
    conn.execute(
        "UPDATE tasks SET ended_at_ms = ?2, end_kind = ?3, end_reason = ?4
         WHERE instance_id = ?1 AND ended_at_ms IS NULL",
        params![instance_id, to_ms(at), task_end.kind(), task_end.detail()],
    )
    .map_err(sqlite("end tasks of ended instance"))?;
    Ok(changed > 0)
}

/// Makes an instance that ended live again, unless its end is sticky (a
/// revocation): its process got a new identity, and the row must be live
/// for a later end (say, a revocation) to be recorded on it. Returns
/// whether it was revived.
pub(crate) fn revive_instance(conn: &Connection, instance_id: &str) -> Result<bool, Error> {
    conn.execute(
        "UPDATE instances SET ended_at_ms = NULL, end_kind = NULL, end_reason = NULL
         WHERE instance_id = ?1 AND ended_at_ms IS NOT NULL AND end_kind IS NOT 'revoked'",
        [instance_id],
    )
    .map(|changed| changed > 0)
    .map_err(sqlite("revive instance"))
}

/// One instance, live or ended.
pub(crate) fn instance(
    conn: &Connection,
    instance_id: &str,
) -> Result<Option<InstanceRecord>, Error> {
    let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?1");
    conn.query_row(&sql, [instance_id], instance_from_row)
        .optional()
        .map_err(sqlite("read instance"))
}

/// The instances not yet ended, oldest first.
pub(crate) fn live_instances(conn: &Connection) -> Result<Vec<InstanceRecord>, Error> {
    let sql = format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE ended_at_ms IS NULL
         ORDER BY first_seen_ms, instance_id"
    );
    collect(conn, &sql, [], instance_from_row).map_err(sqlite("list live instances"))
}

/// Every live instance, newest first, then (with `include_ended`) the
/// `ended_limit` instances that ended last, the latest end first.
pub(crate) fn instances(
    conn: &Connection,
    include_ended: bool,
    ended_limit: usize,
) -> Result<Vec<InstanceRecord>, Error> {
    let live = format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE ended_at_ms IS NULL
         ORDER BY first_seen_ms DESC, instance_id"
    );
    let mut out = collect(conn, &live, [], instance_from_row).map_err(sqlite("list instances"))?;
    if include_ended {
        let ended = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE ended_at_ms IS NOT NULL
             ORDER BY ended_at_ms DESC, instance_id LIMIT ?1"
        );
        let limit = i64::try_from(ended_limit).unwrap_or(i64::MAX);
        out.extend(
            collect(conn, &ended, [limit], instance_from_row)
                .map_err(sqlite("list ended instances"))?,
        );
    }
    Ok(out)
}

/// Inserts a task; refuses a second live task with the same id in one instance.
pub(crate) fn insert_task(conn: &Connection, rec: &TaskRecord) -> Result<(), Error> {
    let result = conn
        .prepare_cached(
            "INSERT INTO tasks (instance_id, task_id, spiffe_id, started_at_ms, expires_at_ms,
                 attributes, started_by, ended_at_ms, end_kind, end_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                rec.instance_id,
                rec.task_id,
                rec.spiffe_id,
                to_ms(rec.started_at),
                to_ms(rec.expires_at),
                to_json(&rec.attributes),
                rec.started_by,
                opt_ms(rec.ended_at),
                rec.end_reason.as_ref().map(TaskEndReason::kind),
                rec.end_reason.as_ref().map(TaskEndReason::detail),
            ])
        });
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate(&e) => Err(Error::TaskExists {
            instance_id: rec.instance_id.clone(),
            task_id: rec.task_id.clone(),
        }),
        Err(e) => Err(sqlite("insert task")(e)),
    }
}

/// Ends a live task. Returns `false` if no such task was live.
pub(crate) fn end_task(
    conn: &Connection,
    instance_id: &str,
    task_id: &str,
    at: SystemTime,
    reason: &TaskEndReason,
) -> Result<bool, Error> {
    conn.execute(
        "UPDATE tasks SET ended_at_ms = ?3, end_kind = ?4, end_reason = ?5
         WHERE instance_id = ?1 AND task_id = ?2 AND ended_at_ms IS NULL",
        params![
            instance_id,
            task_id,
            to_ms(at),
            reason.kind(),
            reason.detail()
        ],
    )
    .map(|changed| changed > 0)
    .map_err(sqlite("end task"))
}

/// The live tasks of one instance (`Some`) or of all instances (`None`),
/// oldest first.
pub(crate) fn live_tasks(
    conn: &Connection,
    instance_id: Option<&str>,
) -> Result<Vec<TaskRecord>, Error> {
    // One query per case: `(?1 IS NULL OR instance_id = ?1)` would keep
    // SQLite from using the live-task index for one instance.
    let filter = if instance_id.is_some() {
        "instance_id = ?1 AND"
    } else {
        "?1 IS NULL AND"
    };
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE {filter} ended_at_ms IS NULL
         ORDER BY started_at_ms, instance_id, task_id"
    );
    collect(conn, &sql, [instance_id], task_from_row).map_err(sqlite("list live tasks"))
}

/// Every task of an instance, live or ended, oldest first.
pub(crate) fn tasks_of(conn: &Connection, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE instance_id = ?1 ORDER BY started_at_ms, id"
    );
    collect(conn, &sql, [instance_id], task_from_row).map_err(sqlite("list tasks"))
}

#[cfg(test)]
mod tests {
    use crate::store::fixtures::{TestStore, done, instance, store, t, task};
    use crate::store::{EndReason, TaskEndReason};
    use crate::store::{Error, InstanceRecord, TaskRecord};

    #[test]
    fn an_instance_round_trips_including_its_end() {
        let (_dir, store) = store();
        let rec = instance("i1");
        store.upsert_instance(&rec).unwrap();
        assert_eq!(store.instance("i1").unwrap(), Some(rec.clone()));
        store.end_instance("i1", t(50), EndReason::Exited).unwrap();
        let ended = store.instance("i1").unwrap().unwrap();
        assert_eq!(ended.ended_at, Some(t(50)));
        assert_eq!(ended.end_reason, Some(EndReason::Exited));
        assert_eq!(store.instance("nope").unwrap(), None);
    }

    #[test]
    fn upserting_a_known_instance_refreshes_last_seen_selectors_and_entries_only() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        let mut again = instance("i1");
        again.first_seen = t(99);
        again.last_seen = t(100);
        again.pid = 1;
        again.selectors = vec!["unix:uid:1000".to_owned()];
        again.entries = vec!["db-reader".to_owned(), "agent".to_owned()];
        store.upsert_instance(&again).unwrap();
        let got = store.instance("i1").unwrap().unwrap();
        assert_eq!((got.first_seen, got.pid), (t(0), 4242));
        assert_eq!(got.last_seen, t(100));
        assert_eq!(got.selectors, again.selectors);
        assert_eq!(got.entries, again.entries, "in order, default first");
    }

    #[test]
    fn listings_show_every_live_instance_and_the_latest_ended_ones() {
        let (_dir, store) = store();
        for (n, id) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            let first_seen = t(n as u64);
            let rec = InstanceRecord {
                first_seen,
                last_seen: first_seen,
                ..instance(id)
            };
            store.upsert_instance(&rec).unwrap();
        }
        store.end_instance("a", t(30), EndReason::Exited).unwrap();
        store.end_instance("c", t(10), EndReason::Exited).unwrap();
        store.end_instance("d", t(20), EndReason::Exited).unwrap();
        let ids = |list: Vec<InstanceRecord>| -> Vec<String> {
            list.into_iter().map(|i| i.instance_id).collect()
        };
        assert_eq!(ids(store.instances(false, 1).unwrap()), vec!["e", "b"]);
        assert_eq!(
            ids(store.instances(true, 2).unwrap()),
            vec!["e", "b", "a", "d"]
        );
        assert_eq!(
            ids(store.instances(true, 10).unwrap()),
            vec!["e", "b", "a", "d", "c"]
        );
        assert_eq!(ids(store.instances(true, 0).unwrap()), vec!["e", "b"]);
    }

    #[test]
    fn a_version_2_instance_reads_back_with_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("sigil.db")).unwrap();
            crate::store::schema::build_version(&conn, 2);
            conn.execute_batch(
                "INSERT INTO instances (instance_id, pid, start_time, boot_id, uid, selectors,
                     first_seen_ms, last_seen_ms) VALUES ('old', 1, 1, 'b', 0, '[]', 0, 0);",
            )
            .unwrap();
        }
        let store = crate::store::Store::open(dir.path()).unwrap();
        let old = store.instance("old").unwrap().unwrap();
        assert!(old.entries.is_empty());
    }

    #[test]
    fn an_instance_that_ended_comes_back_live_unless_it_was_revoked() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        let why = "a gid changed".to_owned();
        store
            .end_instance("i1", t(5), EndReason::NoLongerMatches { why })
            .unwrap();
        let by = "admin".to_owned();
        store
            .end_instance("i2", t(5), EndReason::Revoked { by })
            .unwrap();
        assert!(store.write(|tx| tx.revive_instance("i1")).unwrap());
        assert!(!store.write(|tx| tx.revive_instance("i2")).unwrap());
        assert_eq!(store.instance("i1").unwrap().unwrap().ended_at, None);
        assert!(store.instance("i2").unwrap().unwrap().ended_at.is_some());
    }

    #[test]
    fn live_instances_exclude_ended_ones() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        store.end_instance("i1", t(5), EndReason::Exited).unwrap();
        let live: Vec<String> = store
            .live_instances()
            .unwrap()
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        assert_eq!(live, vec!["i2"]);
    }

    #[test]
    fn a_task_round_trips_including_its_attributes() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        let rec = task("i1", "t1");
        store.insert_task(&rec).unwrap();
        assert_eq!(store.live_tasks("i1").unwrap(), vec![rec.clone()]);
        assert!(store.end_task("i1", "t1", t(20)).unwrap());
        let ended = TaskRecord {
            ended_at: Some(t(20)),
            end_reason: Some(done()),
            ..rec
        };
        assert_eq!(store.tasks_of("i1").unwrap(), vec![ended]);
    }

    #[test]
    fn live_tasks_exclude_ended_ones_and_other_instances() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        store.insert_task(&task("i1", "a")).unwrap();
        store.insert_task(&task("i1", "b")).unwrap();
        store.insert_task(&task("i2", "c")).unwrap();
        store.end_task("i1", "a", t(20)).unwrap();
        let ids = |tasks: Vec<TaskRecord>| -> Vec<String> {
            tasks.into_iter().map(|t| t.task_id).collect()
        };
        assert_eq!(ids(store.live_tasks("i1").unwrap()), vec!["b"]);
        assert_eq!(ids(store.all_live_tasks().unwrap()), vec!["b", "c"]);
    }

    #[test]
    fn ending_a_task_that_is_not_live_returns_false() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        assert!(!store.end_task("i1", "ghost", t(1)).unwrap());
        store.insert_task(&task("i1", "t1")).unwrap();
        assert!(store.end_task("i1", "t1", t(2)).unwrap());
        assert!(!store.end_task("i1", "t1", t(3)).unwrap());
    }

    #[test]
    fn a_duplicate_live_task_id_is_refused_until_the_first_ends() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        store.insert_task(&task("i1", "t1")).unwrap();
        let err = store.insert_task(&task("i1", "t1")).unwrap_err();
        assert!(matches!(err, Error::TaskExists { .. }), "{err}");
        store.insert_task(&task("i2", "t1")).unwrap();
        store.end_task("i1", "t1", t(20)).unwrap();
        store.insert_task(&task("i1", "t1")).unwrap();
        assert_eq!(store.tasks_of("i1").unwrap().len(), 2);
    }

    #[test]
    fn a_task_of_an_unknown_instance_is_refused() {
        let (_dir, store) = store();
        let err = store.insert_task(&task("ghost", "t1")).unwrap_err();
        assert!(matches!(err, Error::Sqlite { .. }), "{err}");
    }

    #[test]
    fn ending_an_instance_ends_its_live_tasks() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.insert_task(&task("i1", "t1")).unwrap();
        store.end_instance("i1", t(30), EndReason::Exited).unwrap();
        assert!(store.all_live_tasks().unwrap().is_empty());
        let ended = &store.tasks_of("i1").unwrap()[0];
        assert_eq!(ended.ended_at, Some(t(30)));
        assert_eq!(
            ended.end_reason,
            Some(TaskEndReason::InstanceEnded(EndReason::Exited))
        );
    }
}
