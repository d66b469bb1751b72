//! What the admin API's status call and the `/readyz` probe read from the
//! store: counts of what is live, the file's size, the newest rotation, and
//! a probe that proves the store still takes writes. It does not decide
//! what "ready" means for the daemon as a whole.

use std::io::ErrorKind;
use std::path::Path;
use std::time::SystemTime;

use rusqlite::Connection;

use super::audit::LAST_ROTATION;
use super::preflight::side_file;
use super::records::{from_ms, to_ms};
use super::{Error, sqlite};

/// Pages a store must still have room for to be called writable (64 KiB
/// at the default 4 KiB page): an issuance writes an SVID row, an audit row
/// and their index entries, and a page split can take a few more.
pub(crate) const HEALTH_RESERVE_PAGES: u64 = 16;

/// A summary of the store, for status listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    /// Instances not yet ended.
    pub live_instances: u64,
    /// Tasks not yet ended, of every instance.
    pub live_tasks: u64,
    /// SVIDs neither revoked nor expired.
    pub live_svids: u64,
    /// Revoked SVIDs not yet expired: the CRL's entries.
    pub revoked_unexpired: u64,
    /// The CRL number last taken (0 before the first CRL).
    pub crl_number: u64,
    /// The database file's size plus its write-ahead log's, in bytes (a file
    /// that cannot be read counts 0).
    pub file_bytes: u64,
    /// When the newest rotation was audited, if any was.
    pub last_rotation: Option<SystemTime>,
}

/// Counts at `now`, in one statement (one consistent snapshot).
pub(crate) fn stats(conn: &Connection, path: &Path, now: SystemTime) -> Result<StoreStats, Error> {
    let sql = format!(
        "SELECT (SELECT count(*) FROM instances WHERE ended_at_ms IS NULL),
            (SELECT count(*) FROM tasks WHERE ended_at_ms IS NULL),
            (SELECT count(*) FROM svids WHERE revoked_at_ms IS NULL AND not_after_ms > ?1),
            (SELECT count(*) FROM svids WHERE revoked_at_ms IS NOT NULL AND not_after_ms > ?1),
            (SELECT crl_number FROM crl_state WHERE id = 1),
            ({LAST_ROTATION})"
    );
    let mut stats = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_row([to_ms(now)], |row| {
                Ok(StoreStats {
                    live_instances: row.get(0)?,
                    live_tasks: row.get(1)?,
                    live_svids: row.get(2)?,
                    revoked_unexpired: row.get(3)?,
                    crl_number: row.get::<_, Option<u64>>(4)?.unwrap_or(0),
                    file_bytes: 0,
                    last_rotation: row.get::<_, Option<i64>>(5)?.map(from_ms),
                })
            })
        })
        .map_err(sqlite("read store statistics"))?;
    stats.file_bytes = [path.to_path_buf(), side_file(path, "-wal")]
        .iter()
        .map(|file| std::fs::metadata(file).map_or(0, |m| m.len()))
        .sum();
    Ok(stats)
}

/// Writes the health row, then checks that the store has room for
/// [`HEALTH_RESERVE_PAGES`] more pages, under its page cap and on its file
/// system (a write that fits in pages the file already has succeeds even
/// on a full disk, so the write alone would not tell).
pub(crate) fn touch_health(conn: &Connection, now: SystemTime) -> Result<(), Error> {
    conn.prepare_cached("INSERT OR REPLACE INTO health (id, at_ms) VALUES (1, ?1)")
        .and_then(|mut stmt| stmt.execute([to_ms(now)]))
        .map_err(sqlite("write the health row"))?;
    let room_pages = room_pages(conn).map_err(sqlite("measure the store's free room"))?;
    if room_pages < HEALTH_RESERVE_PAGES {
        return Err(Error::StoreFull {
            room_pages,
            needed_pages: HEALTH_RESERVE_PAGES,
        });
    }
    Ok(())
}

/// Pages the store can still take: free pages inside the file plus growth
/// allowed by `max_page_count`, but no more growth than the file system has
/// space for (its space for unprivileged users, to stay on the safe side).
fn room_pages(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| -> rusqlite::Result<u64> {
        conn.pragma_query_value(None, name, |row| row.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
    };
    let page_size = pragma("page_size")?.max(1);
    let mut growth = pragma("max_page_count")?.saturating_sub(pragma("page_count")?);
    if let Some(free) = disk_free_bytes(conn) {
        growth = growth.min(free / page_size);
    }
    Ok(growth.saturating_add(pragma("freelist_count")?))
}

/// Bytes free for unprivileged users on the database's file system; `None`
/// when that cannot be told (an in-memory database, a failed `statvfs`).
fn disk_free_bytes(conn: &Connection) -> Option<u64> {
    let path = conn.path().filter(|p| !p.is_empty())?;
    match rustix::fs::statvfs(path) {
        Ok(vfs) => Some(vfs.f_bavail.saturating_mul(vfs.f_frsize)),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => {
            tracing::debug!(path, error = %e, "cannot tell the store's free disk space");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::store::fixtures::{TestStore, instance, store, svid, t, task};
    use crate::store::{AuditEvent, AuditKind, EndReason, Error, StoreStats};

    fn rotation(secs: u64) -> AuditEvent {
        AuditEvent {
            seq: 0,
            at: t(secs),
            kind: AuditKind::Rotation,
            actor: "daemon".to_owned(),
            instance_id: Some("i1".to_owned()),
            task_id: None,
            spiffe_id: None,
            serial: Some("01".to_owned()),
            detail: json!({}),
            hash: None,
        }
    }

    #[test]
    fn an_empty_store_counts_nothing_but_has_a_size() {
        let (_dir, store) = store();
        let stats = store.stats().unwrap();
        assert!(stats.file_bytes > 0);
        let expected = StoreStats {
            file_bytes: stats.file_bytes,
            live_instances: 0,
            live_tasks: 0,
            live_svids: 0,
            revoked_unexpired: 0,
            crl_number: 0,
            last_rotation: None,
        };
        assert_eq!(stats, expected);
    }

    #[test]
    fn stats_count_what_is_live_at_the_time_given() {
        let (_dir, store) = store();
        store.upsert_instance(&instance("i1")).unwrap();
        store.upsert_instance(&instance("i2")).unwrap();
        store.upsert_instance(&instance("gone")).unwrap();
        store.insert_task(&task("i1", "a")).unwrap();
        store.insert_task(&task("i1", "b")).unwrap();
        store.end_task("i1", "b", t(20)).unwrap();
        store
            .end_instance("gone", t(20), EndReason::Exited)
            .unwrap();
        store.record_svid(&svid("01", "i1", None, t(1000))).unwrap();
        store.record_svid(&svid("02", "i1", None, t(50))).unwrap();
        store.record_svid(&svid("03", "i2", None, t(1000))).unwrap();
        store.record_svid(&svid("04", "i2", None, t(80))).unwrap();
        store.revoke_serial("03", t(30), "admin").unwrap();
        store.revoke_serial("04", t(30), "admin").unwrap();
        store.next_crl_number().unwrap();
        store.append_audit(&rotation(40)).unwrap();
        store.append_audit(&rotation(60)).unwrap();
        store
            .append_audit(&AuditEvent {
                kind: AuditKind::Issuance,
                ..rotation(70)
            })
            .unwrap();
        let stats = store.stats_at(t(60)).unwrap();
        assert_eq!(
            (stats.live_instances, stats.live_tasks),
            (2, 1),
            "{stats:?}"
        );
        assert_eq!((stats.live_svids, stats.revoked_unexpired), (1, 2));
        assert_eq!(stats.crl_number, 1);
        assert_eq!(stats.last_rotation, Some(t(60)));
        assert_eq!(store.stats_at(t(100)).unwrap().revoked_unexpired, 1);
    }

    #[test]
    fn the_file_size_includes_the_write_ahead_log() {
        let (dir, store) = store();
        let wal = dir.path().join("sigil.db-wal");
        let main = std::fs::metadata(store.path()).unwrap().len();
        let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert_eq!(store.stats().unwrap().file_bytes, main + wal_len);
    }

    #[test]
    fn the_health_probe_writes_while_there_is_room() {
        let (_dir, store) = store();
        store.write(|tx| tx.touch_health(t(1))).unwrap();
        store.write(|tx| tx.touch_health(t(2))).unwrap();
    }

    #[test]
    fn the_health_probe_fails_once_the_page_quota_is_exhausted_and_recovers() {
        let (_dir, store) = store();
        store.write(|tx| tx.touch_health(t(1))).unwrap();
        let pages = store.page_count().unwrap();
        store.limit_pages(pages).unwrap();
        let err = store.write(|tx| tx.touch_health(t(2))).unwrap_err();
        assert!(matches!(err, Error::StoreFull { .. }), "{err}");
        assert!(err.to_string().contains("free disk space"), "{err}");
        store
            .limit_pages(pages + 2 * super::HEALTH_RESERVE_PAGES)
            .unwrap();
        store.write(|tx| tx.touch_health(t(3))).unwrap();
    }

    #[test]
    fn a_failed_probe_leaves_the_previous_health_row() {
        let (_dir, store) = store();
        store.write(|tx| tx.touch_health(t(1))).unwrap();
        store.limit_pages(store.page_count().unwrap()).unwrap();
        store.write(|tx| tx.touch_health(t(2))).unwrap_err();
        store.limit_pages(0).unwrap();
        let at = store
            .write(|tx| {
                tx.tx
                    .query_row("SELECT at_ms FROM health", [], |r| r.get::<_, i64>(0))
                    .map_err(crate::store::sqlite("read health"))
            })
            .unwrap();
        assert_eq!(
            crate::store::records::from_ms(at),
            t(1),
            "rolled back with its failed check"
        );
    }
}
