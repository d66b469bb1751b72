//! Store-level tests of the audit hash chain on real files: appends chain
//! through the writer (rolled-back jobs included), a version-2 store is
//! chained by its migration, and rows changed or deleted behind Sigil's
//! back through a second connection are named by `verify_audit`.

use std::path::Path;

use rusqlite::Connection;
use serde_json::json;

use super::fixtures::{TestStore, instance, store, t, task};
use super::*;

fn admin(n: u64) -> AuditEvent {
    AuditEvent {
        seq: 0,
        at: t(n),
        kind: AuditKind::Admin,
        actor: "admin uid:0".to_owned(),
        instance_id: Some("i1".to_owned()),
        task_id: n.is_multiple_of(2).then(|| format!("t{n}")),
        spiffe_id: None,
        serial: None,
        detail: json!({"call": "list", "n": n}),
        hash: None,
    }
}

/// A store holding `n` audit rows (seq 1 to n).
fn store_with_rows(n: u64) -> (tempfile::TempDir, Store) {
    let (dir, store) = store();
    for i in 1..=n {
        assert_eq!(store.append_audit(&admin(i)).unwrap(), i as i64);
    }
    (dir, store)
}

/// Runs `sql` on the store's file through a connection of its own, as an
/// operator with `sqlite3` (or an intruder) would.
fn behind_the_back(path: &Path, sql: &str) {
    Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

#[test]
fn an_empty_trail_verifies_with_no_head() {
    let (_dir, store) = store();
    let verdict = store.verify_audit().unwrap();
    let empty = AuditVerdict {
        rows: 0,
        first_bad: None,
        head: None,
    };
    assert_eq!(verdict, empty);
}

#[test]
fn a_fresh_chain_verifies_and_its_head_is_the_newest_rows_hash() {
    let (_dir, store) = store_with_rows(5);
    let verdict = store.verify_audit().unwrap();
    assert_eq!((verdict.rows, &verdict.first_bad), (5, &None));
    let events = store.audit(&AuditQuery::default()).unwrap();
    assert_eq!(verdict.head, events[4].hash);
    let distinct: std::collections::HashSet<_> = events.iter().map(|e| &e.hash).collect();
    assert_eq!(distinct.len(), 5);
}

#[test]
fn writes_rolled_back_alone_in_a_group_leave_the_chain_intact() {
    let (_dir, store) = store();
    store.upsert_instance(&instance("i1")).unwrap();
    let store = std::sync::Arc::new(store);
    let threads: Vec<_> = (0..8_u64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for n in 0..20 {
                    let fail = (w + n).is_multiple_of(3);
                    let _ = store.write(move |tx| {
                        tx.append_audit(&admin(n))?;
                        if fail {
                            tx.insert_task(&task("ghost", "t1"))?; // unknown instance
                        }
                        tx.append_audit(&admin(n + 1))
                    });
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let verdict = store.verify_audit().unwrap();
    assert_eq!(verdict.first_bad, None, "{verdict:?}");
    let rows = store.audit(&AuditQuery::default()).unwrap();
    assert_eq!(verdict.rows, rows.len() as u64);
    let seqs: Vec<i64> = rows.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=rows.len() as i64).collect::<Vec<_>>(), "no gaps");
}

#[test]
fn a_version_2_store_with_audit_rows_migrates_to_a_verifying_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        let conn = conn.transaction().unwrap();
        schema::build_version(&conn, 2);
        // More rows than the migration chains per batch.
        for n in 0..700 {
            conn.execute(
                "INSERT INTO audit (at_ms, kind, actor, instance_id, detail)
                 VALUES (?1, 'attestation', 'pid:1 uid:0', ?2, '{}')",
                rusqlite::params![n, (n % 3 == 0).then_some("i1")],
            )
            .unwrap();
        }
        conn.commit().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let verdict = store.verify_audit().unwrap();
    assert_eq!((verdict.rows, &verdict.first_bad), (700, &None));
    store.append_audit(&admin(1)).unwrap();
    let verdict = store.verify_audit().unwrap();
    assert_eq!((verdict.rows, &verdict.first_bad), (701, &None));
    let update = Connection::open(&path)
        .unwrap()
        .execute("UPDATE audit SET actor = 'x' WHERE seq = 1", []);
    assert!(update.unwrap_err().to_string().contains("append-only"));
}

#[test]
fn a_row_changed_behind_sigils_back_is_named() {
    let (_dir, store) = store_with_rows(5);
    behind_the_back(
        store.path(),
        r#"DROP TRIGGER audit_no_update;
           UPDATE audit SET detail = '{"call":"nothing to see"}' WHERE seq = 3;"#,
    );
    let verdict = store.verify_audit().unwrap();
    assert_eq!(verdict.rows, 5);
    let bad = verdict.first_bad.unwrap();
    assert_eq!(bad.seq, 3);
    assert!(bad.problem.contains("changed"), "{}", bad.problem);
}

#[test]
fn a_deleted_middle_row_is_named_by_the_row_after_it() {
    let (_dir, store) = store_with_rows(5);
    behind_the_back(
        store.path(),
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 3;",
    );
    let verdict = store.verify_audit().unwrap();
    assert_eq!(verdict.rows, 4);
    let bad = verdict.first_bad.unwrap();
    assert_eq!(bad.seq, 4);
    assert!(bad.problem.contains("row 3 was deleted"), "{}", bad.problem);
}

#[test]
fn a_cleared_hash_is_named_and_later_appends_still_work() {
    let (_dir, store) = store_with_rows(3);
    behind_the_back(
        store.path(),
        "DROP TRIGGER audit_no_update; UPDATE audit SET hash = NULL WHERE seq = 3;",
    );
    assert_eq!(store.append_audit(&admin(4)).unwrap(), 4);
    let bad = store.verify_audit().unwrap().first_bad.unwrap();
    assert_eq!(bad.seq, 3);
    assert!(bad.problem.contains("no hash"), "{}", bad.problem);
}

#[test]
fn sequence_numbers_are_not_reused_after_the_newest_row_is_deleted() {
    let (_dir, store) = store_with_rows(3);
    behind_the_back(
        store.path(),
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 3;",
    );
    assert_eq!(store.append_audit(&admin(4)).unwrap(), 4);
    let bad = store.verify_audit().unwrap().first_bad.unwrap();
    assert_eq!(bad.seq, 4);
    assert!(bad.problem.contains("row 3 was deleted"), "{}", bad.problem);
}
