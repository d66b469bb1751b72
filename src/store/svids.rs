//! The SQL for issued SVIDs, their revocation, the CRL entries and the CRL
//! number, as plain functions over a `rusqlite::Connection` shared by `Store`
//! and `Tx`. Instances and tasks are in `instances.rs`.

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use super::records::{
    RevokedSvid, SVID_COLUMNS, SvidRecord, collect, from_ms, opt_ms, svid_from_row, to_ms,
};
use super::{Error, sqlite};

/// Records an issued SVID. The serial must be lower-case hex and new.
pub(crate) fn record_svid(conn: &Connection, rec: &SvidRecord) -> Result<(), Error> {
    check_serial(&rec.serial)?;
    conn.prepare_cached(
        "INSERT INTO svids (serial, spiffe_id, instance_id, task_id, not_before_ms,
             not_after_ms, revoked_at_ms, revoke_reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            rec.serial,
            rec.spiffe_id,
            rec.instance_id,
            rec.task_id,
            to_ms(rec.not_before),
            to_ms(rec.not_after),
            opt_ms(rec.revoked_at),
            rec.revoke_reason,
        ])
    })
    .map(drop)
    .map_err(sqlite("record svid"))
}

/// One SVID by serial (any case), revoked or not.
pub(crate) fn svid(conn: &Connection, serial: &str) -> Result<Option<SvidRecord>, Error> {
    let sql = format!("SELECT {SVID_COLUMNS} FROM svids WHERE serial = ?1");
    conn.query_row(&sql, [serial.to_ascii_lowercase()], svid_from_row)
        .optional()
        .map_err(sqlite("read svid"))
}

/// Every SVID still on record for an instance, oldest first.
pub(crate) fn svids_of(conn: &Connection, instance_id: &str) -> Result<Vec<SvidRecord>, Error> {
    let sql = format!(
        "SELECT {SVID_COLUMNS} FROM svids WHERE instance_id = ?1 ORDER BY not_before_ms, serial"
    );
    collect(conn, &sql, [instance_id], svid_from_row).map_err(sqlite("list svids"))
}

/// Revokes one task's unexpired, unrevoked SVIDs (searched by the
/// `svids_by_owner` index; a test checks the plan).
const REVOKE_TASK_SVIDS: &str = "UPDATE svids SET revoked_at_ms = ?3, revoke_reason = ?4
     WHERE instance_id = ?1 AND task_id = ?2
       AND revoked_at_ms IS NULL AND not_after_ms > ?3
     RETURNING serial";

/// Revokes the unexpired, unrevoked SVIDs of a task (or of a whole instance)
/// in one statement; returns the newly revoked serials, sorted.
pub(crate) fn revoke_svids(
    conn: &Connection,
    instance_id: &str,
    task_id: Option<&str>,
    at: SystemTime,
    reason: &str,
) -> Result<Vec<String>, Error> {
    // Two statements rather than `(?2 IS NULL OR task_id = ?2)`, which
    // keeps SQLite from using the (instance_id, task_id) index: ending one
    // task of an instance that ran thousands would scan all their SVIDs.
    let mut serials = match task_id {
        Some(task_id) => collect(
            conn,
            REVOKE_TASK_SVIDS,
            params![instance_id, task_id, to_ms(at), reason],
            |row| row.get(0),
        ),
        None => collect(
            conn,
            "UPDATE svids SET revoked_at_ms = ?2, revoke_reason = ?3
             WHERE instance_id = ?1 AND revoked_at_ms IS NULL AND not_after_ms > ?2
             RETURNING serial",
            params![instance_id, to_ms(at), reason],
            |row| row.get(0),
        ),
    }
    .map_err(sqlite("revoke svids"))?;
    serials.sort();
    Ok(serials)
}

/// Revokes one SVID by serial (any case). Returns `false` if it is unknown or
/// already revoked.
pub(crate) fn revoke_serial(
    conn: &Connection,
    serial: &str,
    at: SystemTime,
    reason: &str,
) -> Result<bool, Error> {
    conn.execute(
        "UPDATE svids SET revoked_at_ms = ?2, revoke_reason = ?3
         WHERE serial = ?1 AND revoked_at_ms IS NULL",
        params![serial.to_ascii_lowercase(), to_ms(at), reason],
    )
    .map(|changed| changed > 0)
    .map_err(sqlite("revoke serial"))
}

/// The CRL's entries: revoked SVIDs not yet expired at `now`.
pub(crate) fn revoked_unexpired(
    conn: &Connection,
    now: SystemTime,
) -> Result<Vec<RevokedSvid>, Error> {
    collect(
        conn,
        "SELECT serial, revoked_at_ms, not_after_ms FROM svids
         WHERE revoked_at_ms IS NOT NULL AND not_after_ms > ?1
         ORDER BY revoked_at_ms, serial",
        [to_ms(now)],
        |row| {
            Ok(RevokedSvid {
                serial: row.get(0)?,
                revoked_at: from_ms(row.get(1)?),
                not_after: from_ms(row.get(2)?),
            })
        },
    )
    .map_err(sqlite("list revoked svids"))
}

/// Increments the CRL number and returns the new value (the first is 1).
pub(crate) fn next_crl_number(conn: &Connection) -> Result<u64, Error> {
    conn.query_row(
        "UPDATE crl_state SET crl_number = crl_number + 1 WHERE id = 1 RETURNING crl_number",
        [],
        |row| row.get(0),
    )
    .map_err(sqlite("advance crl number"))
}

/// Deletes SVID rows whose `not_after` is more than `keep` before `now`.
pub(crate) fn prune_expired_svids(
    conn: &Connection,
    now: SystemTime,
    keep: Duration,
) -> Result<usize, Error> {
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let cutoff = to_ms(now).saturating_sub(keep_ms);
    conn.execute("DELETE FROM svids WHERE not_after_ms < ?1", [cutoff])
        .map_err(sqlite("prune expired svids"))
}

/// Refuses serials that are not lower-case hex, so lookups by serial match.
fn check_serial(serial: &str) -> Result<(), Error> {
    let hex = !serial.is_empty()
        && serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        Ok(())
    } else {
        Err(Error::InvalidSerial {
            serial: serial.to_owned(),
        })
    }
}
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::store::fixtures::{TestStore, instance, store, svid, t};
    use crate::store::{Error, RevokedSvid};

    #[test]
    fn an_svid_round_trips_including_its_revocation() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        let rec = svid("0a0b0c", "i1", Some("t1"), t(3600));
        store.record_svid(&rec).unwrap();
        assert_eq!(store.svid("0a0b0c").unwrap(), Some(rec.clone()));
        assert!(store.revoke_serial("0A0B0C", t(60), "admin").unwrap());
        let revoked = store.svid("0a0b0c").unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(t(60)));
        assert_eq!(revoked.revoke_reason.as_deref(), Some("admin"));
        assert_eq!(store.svids_of("i1").unwrap(), vec![revoked]);
        assert!(!store.revoke_serial("0a0b0c", t(61), "again").unwrap());
        assert!(!store.revoke_serial("ffff", t(61), "unknown").unwrap());
    }

    #[test]
    fn serials_that_are_not_lower_case_hex_are_refused() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        for bad in ["", "0A", "0x1f", "12:34"] {
            let err = store
                .record_svid(&svid(bad, "i1", None, t(10)))
                .unwrap_err();
            assert!(matches!(err, Error::InvalidSerial { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn revoking_a_task_touches_only_its_unexpired_unrevoked_svids() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store
            .record_svid(&svid("01", "i1", Some("t1"), t(1000)))
            .unwrap();
        store
            .record_svid(&svid("02", "i1", Some("t1"), t(50)))
            .unwrap(); // expired at t(100)
        store
            .record_svid(&svid("03", "i1", Some("t1"), t(1000)))
            .unwrap();
        store.revoke_serial("03", t(90), "earlier").unwrap();
        store
            .record_svid(&svid("04", "i1", Some("t2"), t(1000)))
            .unwrap();
        store.record_svid(&svid("05", "i1", None, t(1000))).unwrap();
        let revoked = store
            .revoke_svids("i1", Some("t1"), t(100), "task ended")
            .unwrap();
        assert_eq!(revoked, vec!["01"]);
        assert_eq!(
            store.svid("03").unwrap().unwrap().revoke_reason.as_deref(),
            Some("earlier")
        );
        assert_eq!(store.svid("02").unwrap().unwrap().revoked_at, None);
        assert_eq!(store.svid("04").unwrap().unwrap().revoked_at, None);
        assert!(
            store
                .revoke_svids("i1", Some("t1"), t(101), "again")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn revoking_an_instance_covers_its_own_and_its_task_svids() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        store.record_svid(&svid("0b", "i1", None, t(1000))).unwrap();
        store
            .record_svid(&svid("0a", "i1", Some("t1"), t(1000)))
            .unwrap();
        store.record_svid(&svid("0c", "i2", None, t(1000))).unwrap();
        let revoked = store
            .revoke_svids("i1", None, t(100), "instance ended")
            .unwrap();
        assert_eq!(revoked, vec!["0a", "0b"]);
        assert_eq!(store.svid("0c").unwrap().unwrap().revoked_at, None);
    }

    #[test]
    fn revoked_entries_leave_the_crl_once_they_expire() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.record_svid(&svid("01", "i1", None, t(200))).unwrap();
        store.record_svid(&svid("02", "i1", None, t(400))).unwrap();
        store.record_svid(&svid("03", "i1", None, t(400))).unwrap();
        store.revoke_svids("i1", None, t(100), "ended").unwrap();
        store.record_svid(&svid("04", "i1", None, t(400))).unwrap();
        let serials = |now| -> Vec<String> {
            store
                .revoked_unexpired(now)
                .unwrap()
                .into_iter()
                .map(|r| r.serial)
                .collect()
        };
        assert_eq!(serials(t(150)), vec!["01", "02", "03"]);
        assert_eq!(serials(t(200)), vec!["02", "03"]);
        assert!(serials(t(400)).is_empty());
        let entry = &store.revoked_unexpired(t(150)).unwrap()[0];
        let expected = RevokedSvid {
            serial: "01".to_owned(),
            revoked_at: t(100),
            not_after: t(200),
        };
        assert_eq!(*entry, expected);
    }

    #[test]
    fn crl_numbers_start_at_one_and_increase() {
        let (_dir, store) = store();
        let numbers: Vec<u64> = (0..3).map(|_| store.next_crl_number().unwrap()).collect();
        assert_eq!(numbers, vec![1, 2, 3]);
    }

    #[test]
    fn pruning_deletes_only_svids_expired_longer_than_keep() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.record_svid(&svid("01", "i1", None, t(100))).unwrap();
        store.record_svid(&svid("02", "i1", None, t(100))).unwrap();
        store.revoke_serial("02", t(50), "x").unwrap();
        store.record_svid(&svid("03", "i1", None, t(500))).unwrap();
        store.record_svid(&svid("04", "i1", None, t(1000))).unwrap();
        let pruned = store
            .prune_expired_svids(t(1000), Duration::from_secs(600))
            .unwrap();
        assert_eq!(pruned, 2);
        let left: Vec<String> = store
            .svids_of("i1")
            .unwrap()
            .into_iter()
            .map(|s| s.serial)
            .collect();
        assert_eq!(left, vec!["03", "04"]);
    }

    #[test]
    fn revoking_one_task_searches_the_owner_index_not_every_svid_of_the_instance() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn, std::path::Path::new(":memory:")).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", super::REVOKE_TASK_SVIDS))
            .unwrap()
            .query_map(rusqlite::params!["i", "t", 1, "r"], |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("; ");
        assert!(
            plan.contains("svids_by_owner (instance_id=? AND task_id=?)"),
            "{plan}"
        );
    }
}
