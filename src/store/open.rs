//! Opening the database file safely: creating it 0600, checking an existing
//! file read-only (integrity, schema version, application id) before anything can
//! write to it, then setting the durability pragmas and migrating. The
//! private modes themselves are made by `fsutil`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::Error;
use super::preflight::{self, SideFiles};
use super::schema::{self, APPLICATION_ID, SUPPORTED_VERSION};
use crate::fsutil::{self, PRIVATE_DIR_MODE};

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "sigil.db";

/// How long a statement waits for a lock held by another connection (e.g. an
/// operator's `sqlite3` shell) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Truncate the WAL back to this size after checkpoints (64 MiB).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Opens or creates `state_dir/sigil.db`, ready for use at the newest schema.
/// `earlier_run` names a file that proves the directory was used before
/// (the CA certificate): an empty store beside it is refused, not renewed.
pub(crate) fn open(
    state_dir: &Path,
    earlier_run: Option<&Path>,
) -> Result<(Connection, PathBuf), Error> {
    let path = state_dir.join(DB_FILE);
    let open_err = |message: String| Error::Open {
        path: path.clone(),
        message,
    };
    fsutil::create_dir_with_mode(state_dir, PRIVATE_DIR_MODE)
        .map_err(|e| open_err(e.to_string()))?;
    let created = fsutil::create_private_file(&path).map_err(|e| open_err(e.to_string()))?;
    if !created {
        preflight::check_not_emptied(&path, earlier_run)?;
        preflight::check_wal(&path)?;
        let side_files = SideFiles::note(&path);
        if let Err(e) = check_existing(&path) {
            side_files.remove_created();
            return Err(e);
        }
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| classify(&path, e))?;
    configure(&conn, &path).map_err(|e| classify(&path, e))?;
    schema::migrate(&mut conn, &path)?;
    restrict_permissions(&path).map_err(|e| open_err(format!("cannot set mode 0600: {e}")))?;
    tracing::info!(path = %path.display(), version = SUPPORTED_VERSION, created, "store opened");
    Ok((conn, path))
}

/// Checks an existing file through a read-only connection, so a damaged,
/// foreign or newer file is reported without a single byte of it changing.
/// The header is read before the schema: a newer Sigil's schema may not parse.
fn check_existing(path: &Path) -> Result<(), Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    let (version, app_id) = header(&conn).map_err(|e| classify(path, e))?;
    let foreign = |why: String| Error::Open {
        path: path.to_path_buf(),
        message: format!(
            "{why}, so it is not a Sigil store; move it away or use another state_dir"
        ),
    };
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(foreign(format!("its application_id is {app_id:#x}")));
    }
    if version > SUPPORTED_VERSION {
        return Err(Error::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            supported: SUPPORTED_VERSION,
        });
    }
    let problems = quick_check(&conn).map_err(|e| classify(path, e))?;
    if problems.first().is_none_or(|first| first != "ok") {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            message: format!("quick_check: {}", problems.join("; ")),
        });
    }
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |row| row.get(0),
        )
        .map_err(|e| classify(path, e))?;
    if version == 0 && tables > 0 {
        return Err(foreign(format!(
            "it holds {tables} tables but no schema version"
        )));
    }
    Ok(())
}

/// `PRAGMA quick_check` output: a single `ok`, or up to 10 problems.
fn quick_check(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(10)")?;
    let rows = stmt.query_map([], |row| row.get(0))?;
    rows.collect()
}

/// The schema version and application id, read from the file header.
fn header(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let version = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let app_id = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    Ok((version, app_id))
}

/// Durability and integrity settings; they are per connection, so every open
/// sets them.
fn configure(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "store could not use WAL; continuing with the rollback journal");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    Ok(())
}

/// Sets 0600 on the database and its WAL and shared-memory files, whatever
/// the umask or an earlier owner left.
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    fsutil::set_private_mode(path)?;
    for suffix in ["-wal", "-shm"] {
        let side = preflight::side_file(path, suffix);
        match fsutil::set_private_mode(&side) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Damage reported by SQLite is [`Error::Corrupt`]; anything else while
/// opening is [`Error::Open`].
fn classify(path: &Path, e: rusqlite::Error) -> Error {
    let corrupt = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    );
    let (path, message) = (path.to_path_buf(), e.to_string());
    if corrupt {
        Error::Corrupt { path, message }
    } else {
        Error::Open { path, message }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;

    use super::*;
    use crate::store::Store;

    fn snapshot(path: &Path) -> (Vec<u8>, SystemTime) {
        (
            fs::read(path).unwrap(),
            fs::metadata(path).unwrap().modified().unwrap(),
        )
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_store_file_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.path(), dir.path().join(DB_FILE));
        assert_eq!(mode(store.path()), 0o600);
        let wal = dir.path().join("sigil.db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
    }

    #[test]
    fn reopening_restores_mode_0600_on_a_loosened_file() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let path = dir.path().join(DB_FILE);
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        drop(Store::open(dir.path()).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_missing_state_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let store = Store::open(&nested).unwrap();
        assert!(store.path().exists());
    }

    #[test]
    fn the_store_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, _) = open(dir.path(), None).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap();
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |row| row.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
    }

    #[test]
    fn a_garbage_file_is_reported_corrupt_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let garbage: Vec<u8> = (0..4096_u32).map(|i| (i * 7 + 13) as u8).collect();
        fs::write(&path, &garbage).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let before = snapshot(&path);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { path: p, .. } if *p == path),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(snapshot(&path), before);
        assert_eq!(mode(&path), 0o640);
    }

    #[test]
    fn a_damaged_page_fails_the_quick_check_and_is_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        drop(Store::open(dir.path()).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        let page = 4096;
        assert!(bytes.len() > 2 * page, "expected several pages");
        // Scribble over the second page (a table root) past its header byte.
        bytes[page..2 * page].fill(0xA5);
        fs::write(&path, &bytes).unwrap();
        let before = snapshot(&path);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert_eq!(snapshot(&path), before);
    }

    #[test]
    fn a_newer_schema_is_refused_and_the_file_is_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        drop(Store::open(dir.path()).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SUPPORTED_VERSION + 1)
                .unwrap();
        }
        let before = snapshot(&path);
        std::thread::sleep(Duration::from_millis(20));
        let err = Store::open(dir.path()).unwrap_err();
        match &err {
            Error::NewerSchema {
                found, supported, ..
            } => {
                assert_eq!(
                    (*found, *supported),
                    (SUPPORTED_VERSION + 1, SUPPORTED_VERSION)
                );
            }
            other => panic!("expected NewerSchema, got {other}"),
        }
        assert!(err.to_string().contains("newer Sigil"), "{err}");
        assert_eq!(snapshot(&path), before);
    }

    #[test]
    fn a_newer_schema_that_this_build_cannot_parse_is_still_reported_as_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        drop(Store::open(dir.path()).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "PRAGMA writable_schema = ON;
                 INSERT INTO sqlite_schema VALUES
                     ('table', 'future', 'future', 0, 'CREATE FUTURE TABLE future (x)');
                 PRAGMA user_version = {};",
                SUPPORTED_VERSION + 1
            ))
            .unwrap();
        }
        let before = snapshot(&path);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::NewerSchema { .. }), "{err}");
        assert_eq!(snapshot(&path), before);
    }

    #[test]
    fn a_foreign_sqlite_file_is_refused_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');")
                .unwrap();
        }
        let before = snapshot(&path);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err}");
        assert!(err.to_string().contains("not a Sigil store"), "{err}");
        assert_eq!(snapshot(&path), before);
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_empty_file_beside_an_earlier_run_is_refused_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let ca = dir.path().join("ca_cert.pem");
        fs::write(&ca, b"cert").unwrap();
        fs::write(&path, b"").unwrap();
        let before = (snapshot(&path), listing(dir.path()));
        let err = Store::open_after(dir.path(), Some(&ca)).unwrap_err();
        assert!(matches!(err, Error::Emptied { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("sigil.db") && text.contains("ca_cert.pem"),
            "{text}"
        );
        assert_eq!((snapshot(&path), listing(dir.path())), before);
    }

    #[test]
    fn a_garbage_wal_is_refused_and_both_files_are_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        drop(Store::open(dir.path()).unwrap());
        let wal = dir.path().join("sigil.db-wal");
        fs::write(&wal, b"not a write-ahead log, honest".repeat(50)).unwrap();
        let before = (snapshot(&path), snapshot(&wal), listing(dir.path()));
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::BadWal { .. }), "{err}");
        assert!(err.to_string().contains("sigil.db-wal"), "{err}");
        assert_eq!(
            (snapshot(&path), snapshot(&wal), listing(dir.path())),
            before
        );
    }

    #[test]
    fn a_refused_wal_store_gets_no_side_files() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.pragma_update(None, "user_version", SUPPORTED_VERSION + 1)
                .unwrap();
        }
        let before = listing(dir.path());
        assert_eq!(before, vec![DB_FILE.to_owned()]);
        Store::open(dir.path()).unwrap_err();
        assert_eq!(listing(dir.path()), before);
    }

    #[test]
    fn an_empty_file_becomes_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DB_FILE), b"").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.write(|tx| tx.next_crl_number()).unwrap(), 1);
    }
}
