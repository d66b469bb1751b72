//! The store's SQL schema as an ordered list of migrations, tracked by
//! `PRAGMA user_version`, and the code that applies them in one transaction.
//! A migration is a list of steps, SQL or Rust (for what SQL cannot do, such
//! as hashing the audit chain). Opening, file checks and pragmas live in
//! `open.rs`.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{Error, chain, sqlite};

/// Marks a database as Sigil's (`PRAGMA application_id`, ASCII "SIGL"), so a
/// foreign SQLite file in the state directory is refused rather than altered.
pub(crate) const APPLICATION_ID: i64 = 0x5349_474C;

/// One step of a migration, run in order inside the migration's transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    /// SQL statements, run as one batch.
    Sql(&'static str),
    /// Rust, for what SQL cannot do; it sees the schema the steps before it
    /// left.
    Rust(fn(&Connection) -> Result<(), Error>),
}

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only:
/// never edit a released migration, add a new one.
pub(crate) const MIGRATIONS: &[&[Step]] = &[&[Step::Sql(V1)], &[Step::Sql(V2)], V3];

/// The newest schema version this build understands.
pub(crate) const SUPPORTED_VERSION: i64 = MIGRATIONS.len() as i64;

/// Version 1: instances, tasks, SVIDs, the CRL number and the audit trail.
/// Times are unix milliseconds; lists and maps are JSON text.
const V1: &str = r"
CREATE TABLE instances (
    instance_id   TEXT PRIMARY KEY NOT NULL,
    pid           INTEGER NOT NULL,
    start_time    INTEGER NOT NULL,
    boot_id       TEXT NOT NULL,
    uid           INTEGER NOT NULL,
    selectors     TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    ended_at_ms   INTEGER,
    end_reason    TEXT
) STRICT;
CREATE INDEX instances_live ON instances (first_seen_ms) WHERE ended_at_ms IS NULL;

CREATE TABLE tasks (
    id            INTEGER PRIMARY KEY,
    instance_id   TEXT NOT NULL REFERENCES instances (instance_id),
    task_id       TEXT NOT NULL,
    spiffe_id     TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    attributes    TEXT NOT NULL,
    started_by    TEXT NOT NULL,
    ended_at_ms   INTEGER,
    end_reason    TEXT
) STRICT;
CREATE UNIQUE INDEX tasks_live ON tasks (instance_id, task_id) WHERE ended_at_ms IS NULL;
CREATE INDEX tasks_by_instance ON tasks (instance_id, started_at_ms);

CREATE TABLE svids (
    serial        TEXT PRIMARY KEY NOT NULL,
    spiffe_id     TEXT NOT NULL,
    instance_id   TEXT NOT NULL REFERENCES instances (instance_id),
    task_id       TEXT,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    revoked_at_ms INTEGER,
    revoke_reason TEXT
) STRICT;
CREATE INDEX svids_by_owner ON svids (instance_id, task_id);
CREATE INDEX svids_by_expiry ON svids (not_after_ms);
CREATE INDEX svids_revoked ON svids (not_after_ms) WHERE revoked_at_ms IS NOT NULL;

CREATE TABLE crl_state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    crl_number INTEGER NOT NULL
) STRICT;
INSERT INTO crl_state (id, crl_number) VALUES (1, 0);

CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('attestation', 'refusal', 'issuance',
                    'rotation', 'task_begin', 'task_end', 'revocation', 'instance_end', 'admin')),
    actor       TEXT NOT NULL,
    instance_id TEXT,
    task_id     TEXT,
    spiffe_id   TEXT,
    serial      TEXT,
    detail      TEXT NOT NULL
) STRICT;
CREATE INDEX audit_by_instance ON audit (instance_id, seq);
CREATE INDEX audit_by_kind ON audit (kind, seq);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;

PRAGMA application_id = 1397311308;
";

/// Version 2: why an instance or a task ended becomes a typed kind in its
/// own column (`end_kind`, see `ends.rs`); `end_reason` keeps its detail.
/// Rows ended before are classified from their text, which was written by
/// fixed phrases (an unknown phrase is not a revocation, as before).
const V2: &str = r"
ALTER TABLE instances ADD COLUMN end_kind TEXT CHECK (end_kind IN ('exited', 'executed',
    'revoked', 'no_longer_matches', 'gone_across_restart'));
UPDATE instances SET end_kind = CASE
    WHEN end_reason LIKE 'revoked by %' THEN 'revoked'
    WHEN end_reason = 'the process executed another program' THEN 'executed'
    WHEN end_reason = 'process gone across a restart' THEN 'gone_across_restart'
    WHEN end_reason LIKE '%any more' OR end_reason LIKE 'no longer matches%'
        THEN 'no_longer_matches'
    ELSE 'exited' END
WHERE ended_at_ms IS NOT NULL;
UPDATE instances SET end_reason = substr(end_reason, 12) WHERE end_kind = 'revoked';

ALTER TABLE tasks ADD COLUMN end_kind TEXT CHECK (end_kind IN ('requested', 'ttl_expired',
    'expired_while_away', 'not_issued', 'instance_ended'));
UPDATE tasks SET end_kind = CASE
    WHEN end_reason = 'ended by request' THEN 'requested'
    WHEN end_reason = 'ttl expired' THEN 'ttl_expired'
    WHEN end_reason = 'expired while the daemon was away' THEN 'expired_while_away'
    WHEN end_reason = 'could not issue its SVID' THEN 'not_issued'
    ELSE 'instance_ended' END
WHERE ended_at_ms IS NOT NULL;
";

/// Version 3, for the admin API: the audit trail becomes a hash chain (see
/// `chain.rs`; rows already written are chained in `seq` order, with the
/// trigger refusing updates dropped and recreated around it), stored
/// registration entries, the entries each instance holds SVIDs of, a
/// one-row table that readiness probes write, and indexes for the admin
/// API's reads.
const V3: &[Step] = &[
    Step::Sql(V3_SCHEMA),
    Step::Sql("DROP TRIGGER audit_no_update;"),
    Step::Rust(chain::chain_existing_rows),
    Step::Sql(AUDIT_NO_UPDATE),
];

/// Version 3's new columns, tables and indexes.
const V3_SCHEMA: &str = r"
ALTER TABLE audit ADD COLUMN hash TEXT;
CREATE INDEX audit_by_task ON audit (task_id, seq) WHERE task_id IS NOT NULL;
CREATE INDEX audit_by_time ON audit (at_ms);

CREATE TABLE entries (
    name          TEXT PRIMARY KEY NOT NULL,
    spec          TEXT NOT NULL,
    owner         TEXT,
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT NOT NULL
) STRICT;

ALTER TABLE instances ADD COLUMN entries TEXT NOT NULL DEFAULT '[]';
CREATE INDEX instances_ended ON instances (ended_at_ms) WHERE ended_at_ms IS NOT NULL;

CREATE TABLE health (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    at_ms INTEGER NOT NULL
) STRICT;
";

/// The trigger refusing updates of audit rows, as version 1 created it.
const AUDIT_NO_UPDATE: &str = r"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;";

/// Brings the schema up to [`SUPPORTED_VERSION`] in one immediate
/// transaction, so a crash mid-migration leaves the previous version intact.
///
/// # Errors
/// [`Error::NewerSchema`] if the file is newer than this build (checked again
/// under the write lock), [`Error::Sqlite`] if a migration fails.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), Error> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite("begin migration"))?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sqlite("read schema version"))?;
    if found > SUPPORTED_VERSION {
        return Err(Error::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SUPPORTED_VERSION,
        });
    }
    let start = usize::try_from(found).unwrap_or(0);
    for (index, steps) in MIGRATIONS.iter().enumerate().skip(start) {
        for step in *steps {
            match step {
                Step::Sql(sql) => tx.execute_batch(sql).map_err(sqlite("apply migration"))?,
                Step::Rust(run) => run(&tx)?,
            }
        }
        tracing::info!(path = %path.display(), version = index + 1, "store schema migrated");
    }
    tx.pragma_update(None, "user_version", SUPPORTED_VERSION)
        .map_err(sqlite("write schema version"))?;
    tx.commit().map_err(sqlite("commit migration"))
}

/// Builds the schema of an older `version` on `conn`, as that Sigil left it
/// (for tests of the migrations after it).
#[cfg(test)]
pub(crate) fn build_version(conn: &Connection, version: usize) {
    for steps in &MIGRATIONS[..version] {
        for step in *steps {
            match step {
                Step::Sql(sql) => conn.execute_batch(sql).unwrap(),
                Step::Rust(run) => run(conn).unwrap(),
            }
        }
    }
    conn.pragma_update(None, "user_version", version).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_fresh_database_is_migrated_to_the_supported_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        assert_eq!(version(&conn), SUPPORTED_VERSION);
        let id: i64 = conn
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .unwrap();
        assert_eq!(id, APPLICATION_ID);
    }

    #[test]
    fn migrating_twice_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        assert_eq!(version(&conn), SUPPORTED_VERSION);
    }

    #[test]
    fn a_newer_schema_version_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", SUPPORTED_VERSION + 1)
            .unwrap();
        let err = migrate(&mut conn, Path::new(":memory:")).unwrap_err();
        assert!(matches!(err, Error::NewerSchema { found, .. } if found == SUPPORTED_VERSION + 1));
    }

    #[test]
    fn version_1_rows_get_their_end_kind_from_their_text() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO instances VALUES ('a', 1, 1, 'b', 0, '[]', 0, 0, 5, 'revoked by admin uid:0');
             INSERT INTO instances VALUES ('b', 1, 1, 'b', 0, '[]', 0, 0, 5, 'process exited');
             INSERT INTO instances VALUES ('c', 1, 1, 'b', 0, '[]', 0, 0, 5,
                 'process 1 matches no registration entry any more');
             INSERT INTO instances VALUES ('d', 1, 1, 'b', 0, '[]', 0, 0, NULL, NULL);
             INSERT INTO tasks VALUES (1, 'a', 't', 's', 0, 9, '{}', 'x', 5, 'ttl expired');",
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let kinds: Vec<(String, Option<String>, Option<String>)> = conn
            .prepare("SELECT instance_id, end_kind, end_reason FROM instances ORDER BY instance_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(kinds[0], ("a".into(), some("revoked"), some("admin uid:0")));
        assert_eq!(kinds[1].1, some("exited"));
        assert_eq!(kinds[2].1, some("no_longer_matches"));
        assert_eq!(kinds[3].1, None, "a live instance has no end kind");
        let task: Option<String> = conn
            .query_row("SELECT end_kind FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(task, some("ttl_expired"));
    }

    #[test]
    fn version_3_recreates_the_update_trigger_exactly_as_version_1_made_it() {
        assert!(V1.contains(AUDIT_NO_UPDATE));
    }

    #[test]
    fn version_3_keeps_version_2_rows_and_gives_instances_no_entries() {
        let mut conn = Connection::open_in_memory().unwrap();
        build_version(&conn, 2);
        conn.execute_batch(
            "INSERT INTO instances (instance_id, pid, start_time, boot_id, uid, selectors,
                 first_seen_ms, last_seen_ms) VALUES ('a', 1, 1, 'b', 0, '[]', 0, 0);",
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let entries: String = conn
            .query_row("SELECT entries FROM instances", [], |r| r.get(0))
            .unwrap();
        assert_eq!(entries, "[]");
        let update = conn.execute("UPDATE audit SET actor = 'x'", []);
        assert!(update.is_ok(), "no rows, so no trigger fires");
        conn.execute(
            "INSERT INTO audit (at_ms, kind, actor, detail) VALUES (0, 'admin', 'x', 'null')",
            [],
        )
        .unwrap();
        let update = conn.execute("UPDATE audit SET actor = 'y'", []);
        assert!(update.unwrap_err().to_string().contains("append-only"));
    }

    #[test]
    fn the_application_id_literal_matches_the_constant() {
        assert!(V1.contains(&format!("application_id = {APPLICATION_ID};")));
    }
}
