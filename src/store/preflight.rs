//! Checks on the store's files made before SQLite sees them, and the
//! promise that a refused store is left exactly as it was.
//!
//! SQLite treats a zero-length database as a new one and silently discards
//! a write-ahead log whose header is not valid; either would lose recorded
//! revocations without a word. And even a read-only SQLite connection
//! creates `-wal` and `-shm` files beside a WAL database. So: an empty file
//! in a directory that was used before is refused, a WAL with a bad header
//! is refused, and [`SideFiles`] removes the side files a failed check
//! created. Does not own: what SQLite checks itself (`open.rs`).

use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use super::Error;

/// Bytes in a WAL file header (SQLite file format, section 4.1).
const WAL_HEADER_LEN: usize = 32;
/// The WAL magic numbers: checksums in little- or big-endian words.
const WAL_MAGIC_LE: u32 = 0x377f_0682;
const WAL_MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite has ever written.
const WAL_VERSION: u32 = 3_007_000;

/// The path of a side file: `sigil.db-wal`, `sigil.db-shm`.
pub(super) fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut side = db.as_os_str().to_owned();
    side.push(suffix);
    PathBuf::from(side)
}

/// Refuses an existing, zero-length store when `earlier_run` (e.g. the CA
/// certificate) shows the state directory was used before: SQLite would
/// start a new store and the revocations it held would be forgotten.
pub(super) fn check_not_emptied(db: &Path, earlier_run: Option<&Path>) -> Result<(), Error> {
    let Some(evidence) = earlier_run else {
        return Ok(());
    };
    let len = fs::symlink_metadata(db)
        .map_err(|e| Error::Open {
            path: db.to_owned(),
            message: format!("cannot inspect it: {e}"),
        })?
        .len();
    if len == 0 {
        return Err(Error::Emptied {
            path: db.to_owned(),
            evidence: evidence.to_owned(),
        });
    }
    Ok(())
}

/// Refuses a `-wal` file that is not empty and does not start with a valid
/// WAL header: SQLite would ignore it and overwrite it at the next write,
/// losing whatever transactions it held.
pub(super) fn check_wal(db: &Path) -> Result<(), Error> {
    let wal = side_file(db, "-wal");
    let mut file = match fs::File::open(&wal) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Open {
                path: db.to_owned(),
                message: format!("cannot read its write-ahead log {}: {e}", wal.display()),
            });
        }
    };
    let mut header = Vec::with_capacity(WAL_HEADER_LEN);
    file.by_ref()
        .take(WAL_HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(|e| Error::Open {
            path: db.to_owned(),
            message: format!("cannot read its write-ahead log {}: {e}", wal.display()),
        })?;
    match wal_header_problem(&header) {
        None => Ok(()),
        Some(problem) => Err(Error::BadWal {
            path: db.to_owned(),
            wal,
            problem,
        }),
    }
}

/// What is wrong with a WAL header, or `None` when it is valid or the file
/// is empty (SQLite leaves an empty WAL after a checkpoint).
fn wal_header_problem(header: &[u8]) -> Option<String> {
    if header.is_empty() {
        return None;
    }
    if header.len() < WAL_HEADER_LEN {
        return Some(format!(
            "it is {} bytes long, shorter than a WAL header",
            header.len()
        ));
    }
    let word = |i: usize, big: bool| {
        let bytes = [header[i], header[i + 1], header[i + 2], header[i + 3]];
        if big {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    };
    let magic = word(0, true);
    let big = match magic {
        WAL_MAGIC_LE => false,
        WAL_MAGIC_BE => true,
        other => return Some(format!("its magic number is {other:#010x}, not SQLite's")),
    };
    let version = word(4, true);
    if version != WAL_VERSION {
        return Some(format!(
            "its format version is {version}, not {WAL_VERSION}"
        ));
    }
    // SQLite's WAL checksum over the first 24 bytes, in pairs of words.
    let (mut s0, mut s1) = (0_u32, 0_u32);
    for i in (0..24).step_by(8) {
        s0 = s0.wrapping_add(word(i, big)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(i + 4, big)).wrapping_add(s0);
    }
    if (s0, s1) != (word(24, true), word(28, true)) {
        return Some("its header checksum does not match".to_owned());
    }
    None
}

/// Which of the `-wal` and `-shm` files existed before a check, so the ones
/// a failed check created can be removed again.
pub(super) struct SideFiles {
    missing: Vec<PathBuf>,
}

impl SideFiles {
    /// Notes which side files of `db` are missing now.
    pub(super) fn note(db: &Path) -> Self {
        let missing = ["-wal", "-shm"]
            .iter()
            .map(|suffix| side_file(db, suffix))
            .filter(
                |p| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == ErrorKind::NotFound),
            )
            .collect();
        Self { missing }
    }

    /// Removes the side files that were missing when [`SideFiles::note`]
    /// ran: a refused store is left as it was found.
    pub(super) fn remove_created(self) {
        for path in self.missing {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a file the store check created");
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, big: bool) -> Vec<u8> {
        let mut h = Vec::new();
        for w in [magic, WAL_VERSION, 4096, 0, 0x1234_5678, 0x9abc_def0] {
            h.extend_from_slice(&w.to_be_bytes());
        }
        let word = |i: usize| {
            let b = [h[i], h[i + 1], h[i + 2], h[i + 3]];
            if big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        let (mut s0, mut s1) = (0_u32, 0_u32);
        for i in (0..24).step_by(8) {
            s0 = s0.wrapping_add(word(i)).wrapping_add(s1);
            s1 = s1.wrapping_add(word(i + 4)).wrapping_add(s0);
        }
        h.extend_from_slice(&s0.to_be_bytes());
        h.extend_from_slice(&s1.to_be_bytes());
        h
    }

    #[test]
    fn a_wal_header_written_by_sqlite_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let wal = fs::read(side_file(&db, "-wal")).unwrap();
        assert!(wal.len() > WAL_HEADER_LEN, "the WAL holds frames");
        assert_eq!(wal_header_problem(&wal), None);
        check_wal(&db).unwrap();
    }

    #[test]
    fn both_checksum_byte_orders_are_understood() {
        assert_eq!(wal_header_problem(&header(WAL_MAGIC_LE, false)), None);
        assert_eq!(wal_header_problem(&header(WAL_MAGIC_BE, true)), None);
        let mut wrong = header(WAL_MAGIC_LE, false);
        wrong[20] ^= 1;
        assert!(wal_header_problem(&wrong).is_some());
    }

    #[test]
    fn garbage_in_the_wal_is_named_with_what_is_wrong() {
        let short = wal_header_problem(b"garbage").unwrap();
        assert!(short.contains("shorter"), "{short}");
        let magic = wal_header_problem(&[0x41; 64]).unwrap();
        assert!(magic.contains("magic"), "{magic}");
        assert_eq!(wal_header_problem(b""), None);
    }
}
