//! The durable store: instances, tasks, every issued SVID, revocations, the
//! CRL number and the append-only audit trail, in one SQLite file
//! (`state_dir/sigil.db`, WAL, `synchronous=FULL`) that survives restarts and
//! `kill -9`.
//!
//! This module owns [`Store`], its [`Error`] and [`Store::transaction`]. The
//! record types are in `records.rs`, their SQL in `instances.rs` and
//! `svids.rs`, the audit trail in `audit.rs`, the schema in `schema.rs` and
//! the careful opening of the file in `open.rs`. It does not decide *when* to revoke or what to
//! audit; `identity` does. Calls block on disk I/O (every commit is fsynced),
//! so async callers run them through `identity::blocking` (block_in_place).

mod audit;
#[cfg(test)]
mod fixtures;
mod instances;
mod open;
mod preflight;
mod records;
mod schema;
mod svids;
mod tx;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, TransactionBehavior};

pub use audit::{AuditEvent, AuditKind, AuditQuery};
pub use records::{InstanceRecord, RevokedSvid, SvidRecord, TaskRecord};
pub use tx::Tx;

/// What can go wrong with the store; every message says what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or created (permissions, missing
    /// directory, a file that is not Sigil's).
    #[error(
        "cannot open the Sigil store {}: {message}; check that state_dir is writable by the daemon's user",
        path.display()
    )]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite or the file system said.
        message: String,
    },
    /// The file is damaged or not a database; it was left untouched.
    #[error(
        "the Sigil store {} is corrupt ({message}); it was left untouched: move it aside to start a fresh store (keep it for its audit trail), or restore a backup",
        path.display()
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite or the integrity check reported.
        message: String,
    },
    /// The file is empty although the state directory was used before: a new
    /// store would forget every revocation. It was left untouched.
    #[error(
        "the Sigil store {} is empty, but {} shows this state directory was used before, so its revocations would be lost; it was left untouched: restore the store from a backup, or delete the empty file to start a fresh store (SVIDs revoked before are then forgotten by the CRL)",
        path.display(), evidence.display()
    )]
    Emptied {
        /// The database file.
        path: PathBuf,
        /// The file that shows an earlier run (the CA certificate).
        evidence: PathBuf,
    },
    /// The write-ahead log beside the file is not one SQLite wrote; SQLite
    /// would discard it silently. Both were left untouched.
    #[error(
        "the write-ahead log {} of the Sigil store {} is damaged ({problem}); SQLite would discard it and the transactions it holds, so both were left untouched: restore a backup, or move the -wal file aside to accept losing them",
        wal.display(), path.display()
    )]
    BadWal {
        /// The database file.
        path: PathBuf,
        /// The `-wal` file.
        wal: PathBuf,
        /// What is wrong with its header.
        problem: String,
    },
    /// The file has a schema this build does not know; it was left untouched.
    #[error(
        "the Sigil store {} has schema version {found} but this Sigil supports up to {supported}: it was written by a newer Sigil; upgrade, or use another state_dir",
        path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The file's `user_version`.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// A read or write failed at run time (disk full, I/O error, constraint).
    #[error("the store could not {context}: {message}")]
    Sqlite {
        /// What the store was doing.
        context: &'static str,
        /// What SQLite said.
        message: String,
    },
    /// A live task with this id already exists in the instance.
    #[error(
        "task {task_id} of instance {instance_id} is already running; end it first or use another task id"
    )]
    TaskExists {
        /// The instance.
        instance_id: String,
        /// The duplicate task id.
        task_id: String,
    },
    /// An SVID serial that is not lower-case hex, which lookups could miss.
    #[error(
        "svid serial {serial:?} is not lower-case hex; record serials as hex::encode gives them"
    )]
    InvalidSerial {
        /// The serial as given.
        serial: String,
    },
    /// An audit kind name that is not one of [`AuditKind::ALL`].
    #[error(
        "unknown audit kind {kind:?}; use one of attestation, refusal, issuance, rotation, task_begin, task_end, revocation, instance_end, admin"
    )]
    UnknownAuditKind {
        /// The name as given.
        kind: String,
    },
}

/// Maps a rusqlite error to [`Error::Sqlite`] with what the store was doing.
pub(crate) fn sqlite(context: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| Error::Sqlite {
        context,
        message: e.to_string(),
    }
}

/// The open store. One connection behind a mutex: SQLite writes are serial
/// anyway, and it keeps transactions simple. Share it in an `Arc`.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens or creates `state_dir/sigil.db` (mode 0600; the directory is
    /// created 0700 if missing) and migrates it to the current schema. An
    /// existing file is checked read-only first (`PRAGMA quick_check`, schema
    /// version, application id), so a bad file is reported, never altered.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged file, [`Error::NewerSchema`] for a
    /// file from a newer Sigil, [`Error::Open`] for anything else that stops
    /// the file from being opened, [`Error::Sqlite`] if a migration fails.
    pub fn open(state_dir: &Path) -> Result<Store, Error> {
        Self::open_after(state_dir, None)
    }

    /// As [`Store::open`], for a state directory that `earlier_run` (the CA
    /// certificate, when it exists) shows was used before: an existing but
    /// empty store file is then refused instead of becoming a new store.
    ///
    /// # Errors
    /// As [`Store::open`], plus [`Error::Emptied`] and [`Error::BadWal`].
    pub fn open_after(state_dir: &Path, earlier_run: Option<&Path>) -> Result<Store, Error> {
        let (conn, path) = open::open(state_dir, earlier_run)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file, for logs and error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Caps the database at `max_pages` pages (`PRAGMA max_page_count`; 0
    /// lifts the cap to SQLite's maximum), as a quota would, and returns
    /// the cap in force. Writes past it fail as on a full disk, which is
    /// how the tests check that a full disk refuses cleanly and loses nothing.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the pragma fails.
    pub fn limit_pages(&self, max_pages: u64) -> Result<u64, Error> {
        let conn = self.lock();
        let wanted = if max_pages == 0 {
            u64::from(u32::MAX) - 1
        } else {
            max_pages
        };
        conn.query_row(&format!("PRAGMA max_page_count = {wanted}"), [], |row| {
            row.get::<_, i64>(0)
        })
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(sqlite("set max_page_count"))
    }

    /// Pages the database uses now.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the pragma fails.
    pub fn page_count(&self) -> Result<u64, Error> {
        let conn = self.lock();
        conn.query_row("PRAGMA page_count", [], |row| row.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(sqlite("read page_count"))
    }

    /// Runs `f` in one transaction that commits if `f` returns `Ok` and rolls
    /// back otherwise, so related writes (an SVID and its audit event) land
    /// together or not at all. `f` must use the [`Tx`], not this `Store`:
    /// calling the store from inside `f` deadlocks.
    ///
    /// # Errors
    /// `f`'s error, or [`Error::Sqlite`] if the transaction cannot begin or
    /// commit.
    pub fn transaction<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite("begin a transaction"))?;
        let tx = Tx { tx };
        let value = f(&tx)?;
        tx.tx.commit().map_err(sqlite("commit a transaction"))?;
        Ok(value)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction drops (rolls back) the transaction before
        // the guard, so the connection behind a poisoned lock is consistent.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a newly attested instance or refreshes a known one; see
    /// [`Tx::upsert_instance`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn upsert_instance(&self, rec: &InstanceRecord) -> Result<(), Error> {
        self.transaction(|tx| tx.upsert_instance(rec))
    }

    /// Ends a live instance and its live tasks; see [`Tx::end_instance`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn end_instance(
        &self,
        instance_id: &str,
        at: SystemTime,
        reason: &str,
    ) -> Result<(), Error> {
        self.transaction(|tx| tx.end_instance(instance_id, at, reason))
    }

    /// The instances not yet ended, oldest first: what a restarted daemon
    /// must re-check.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn live_instances(&self) -> Result<Vec<InstanceRecord>, Error> {
        self.read(instances::live_instances)
    }

    /// One instance, live or ended, for listings and the admin API.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>, Error> {
        self.read(|conn| instances::instance(conn, instance_id))
    }

    /// Records a started task; see [`Tx::insert_task`].
    ///
    /// # Errors
    /// [`Error::TaskExists`] for a duplicate live task id; [`Error::Sqlite`]
    /// otherwise.
    pub fn insert_task(&self, rec: &TaskRecord) -> Result<(), Error> {
        self.transaction(|tx| tx.insert_task(rec))
    }

    /// Ends a live task; returns `false` if none was live. See [`Tx::end_task`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn end_task(
        &self,
        instance_id: &str,
        task_id: &str,
        at: SystemTime,
        reason: &str,
    ) -> Result<bool, Error> {
        self.transaction(|tx| tx.end_task(instance_id, task_id, at, reason))
    }

    /// The live tasks of one instance, oldest first.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn live_tasks(&self, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::live_tasks(conn, Some(instance_id)))
    }

    /// The live tasks of every instance, oldest first: what a restarted
    /// daemon must expire or resume.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn all_live_tasks(&self) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::live_tasks(conn, None))
    }

    /// Every task of an instance, live or ended, oldest first (history).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn tasks_of(&self, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::tasks_of(conn, instance_id))
    }

    /// Records an issued SVID; see [`Tx::record_svid`].
    ///
    /// # Errors
    /// [`Error::InvalidSerial`] or [`Error::Sqlite`].
    pub fn record_svid(&self, rec: &SvidRecord) -> Result<(), Error> {
        self.transaction(|tx| tx.record_svid(rec))
    }

    /// One SVID by serial (hex, any case), revoked or not.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, Error> {
        self.read(|conn| svids::svid(conn, serial))
    }

    /// Every SVID still on record for an instance, oldest first.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn svids_of(&self, instance_id: &str) -> Result<Vec<SvidRecord>, Error> {
        self.read(|conn| svids::svids_of(conn, instance_id))
    }

    /// Revokes every SVID of the task (or of the whole instance when
    /// `task_id` is `None`) that is not yet expired at `at` and not already
    /// revoked; returns the newly revoked serials. See [`Tx::revoke_svids`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn revoke_svids(
        &self,
        instance_id: &str,
        task_id: Option<&str>,
        at: SystemTime,
        reason: &str,
    ) -> Result<Vec<String>, Error> {
        self.transaction(|tx| tx.revoke_svids(instance_id, task_id, at, reason))
    }

    /// Revokes one SVID by serial; see [`Tx::revoke_serial`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn revoke_serial(&self, serial: &str, at: SystemTime, reason: &str) -> Result<bool, Error> {
        self.transaction(|tx| tx.revoke_serial(serial, at, reason))
    }

    /// Revoked SVIDs whose `not_after` is still in the future at `now`: what
    /// the CRL lists. Ordered by revocation time, then serial.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn revoked_unexpired(&self, now: SystemTime) -> Result<Vec<RevokedSvid>, Error> {
        self.read(|conn| svids::revoked_unexpired(conn, now))
    }

    /// Increments and returns the CRL number (starts at 1), durably, so CRL
    /// numbers never repeat across restarts.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn next_crl_number(&self) -> Result<u64, Error> {
        self.transaction(|tx| tx.next_crl_number())
    }

    /// Deletes SVID rows that expired more than `keep` before `now`, revoked
    /// or not (housekeeping). Returns how many.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the delete fails.
    pub fn prune_expired_svids(&self, now: SystemTime, keep: Duration) -> Result<usize, Error> {
        self.transaction(|tx| tx.prune_expired_svids(now, keep))
    }

    /// Appends an audit event (its `seq` is ignored) and returns its sequence
    /// number. The trail is append-only.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the write fails.
    pub fn append_audit(&self, event: &AuditEvent) -> Result<i64, Error> {
        self.transaction(|tx| tx.append_audit(event))
    }

    /// Audit events matching `query`, oldest first; see [`AuditQuery`] for
    /// how `since_seq` and `limit` combine.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        self.read(|conn| audit::query(conn, query))
    }
}

#[cfg(test)]
mod tests;
