//! The durable store: instances, tasks, every issued SVID, revocations, the
//! CRL number and the append-only audit trail, in one SQLite file
//! (`state_dir/sigil.db`, WAL, `synchronous=FULL`) that survives restarts and
//! `kill -9`.
//!
//! This module owns [`Store`] and its [`Error`]. Every write goes through
//! [`Store::write`] / [`Store::write_async`] to one writer thread that
//! group-commits concurrent writes (`writer.rs`: one fsync per group, no
//! caller acknowledged before the commit that holds its rows); the few reads
//! the daemon needs use a separate read connection. The record types are in
//! `records.rs`, why things end in `ends.rs`, their SQL in `instances.rs` and
//! `svids.rs`, the audit trail in `audit.rs` and its hash chain in
//! `chain.rs`, stored registration entries in `entries.rs`, status counts
//! and the readiness probe in `status.rs`, the schema in `schema.rs` and the
//! careful opening of the file in `open.rs`. It does not decide *when* to
//! revoke or what to audit; `identity` does.

mod audit;
mod chain;
mod ends;
mod entries;
#[cfg(test)]
mod fixtures;
mod instances;
mod open;
mod preflight;
mod records;
mod schema;
mod status;
mod svids;
mod tx;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags};

pub use audit::{AuditEvent, AuditKind, AuditQuery};
pub use chain::{AuditVerdict, BrokenLink};
pub use entries::StoredEntry;
pub use open::DB_FILE;
pub use records::{EndReason, InstanceRecord, RevokedSvid, SvidRecord, TaskEndReason, TaskRecord};
pub use status::StoreStats;
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
    #[error("the store could not {context}: {source}")]
    Sqlite {
        /// What the store was doing.
        context: &'static str,
        /// What SQLite said (shared: one failed group commit is every
        /// caller's error).
        #[source]
        source: std::sync::Arc<rusqlite::Error>,
    },
    /// A write panicked (a bug); it was rolled back alone, and the writer
    /// goes on with the others.
    #[error("a write to the store failed inside Sigil (a bug; see the log): it was rolled back")]
    WritePanicked,
    /// The writer thread is gone (the daemon is stopping), so nothing more
    /// can be written.
    #[error("the store's writer has stopped (the daemon is shutting down); nothing was written")]
    WriterStopped,
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
    #[error("unknown audit kind {kind:?}; use one of {}", AuditKind::names())]
    UnknownAuditKind {
        /// The name as given.
        kind: String,
    },
    /// A stored registration entry with this name exists already.
    #[error(
        "a registration entry named {name:?} exists already; delete it first or pick another name"
    )]
    EntryExists {
        /// The name as given.
        name: String,
    },
    /// The store has too little room left to record identities: its file
    /// system is nearly full (or its `max_page_count` cap, which only
    /// tests set, is reached).
    #[error(
        "the store has room for only {room_pages} more pages ({needed_pages} needed to record identities safely); free disk space on the file system that holds state_dir"
    )]
    StoreFull {
        /// Pages it can still take.
        room_pages: u64,
        /// Pages it should be able to take.
        needed_pages: u64,
    },
}

/// Maps a rusqlite error to [`Error::Sqlite`] with what the store was doing.
pub(crate) fn sqlite(context: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| Error::Sqlite {
        context,
        source: std::sync::Arc::new(e),
    }
}

/// The open store: one writer thread that owns the write connection and
/// commits concurrent writes in groups (see `writer.rs`), and one read
/// connection for the few reads the daemon needs (WAL lets it read while
/// the writer commits). Share it in an `Arc`.
#[derive(Debug)]
pub struct Store {
    writer: writer::Writer,
    reader: Mutex<Connection>,
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
        let reader = open_reader(&path)?;
        let writer = writer::Writer::start(conn, path.clone())?;
        Ok(Store {
            writer,
            reader: Mutex::new(reader),
            path,
        })
    }

    /// The database file, for logs and error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` in a transaction of the writer thread and blocks until it
    /// is committed: `Ok` means its rows are on disk. `work` commits or rolls
    /// back alone (a savepoint), even when grouped with other callers' work.
    ///
    /// # Errors
    /// `work`'s error, or [`Error::Sqlite`] if the group's transaction cannot
    /// begin or commit.
    pub fn write<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
    {
        self.writer.write(work)
    }

    /// As [`Store::write`], for async callers: waits without blocking a
    /// runtime thread.
    ///
    /// # Errors
    /// As [`Store::write`].
    pub async fn write_async<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
    {
        self.writer.write_async(work).await
    }

    /// Runs reads `f` on the blocking pool, so an async caller never waits
    /// on the read connection's lock or on disk.
    ///
    /// # Errors
    /// `f`'s error, or [`Error::WriterStopped`] when the runtime is going
    /// away.
    pub async fn read_async<T, F>(self: &std::sync::Arc<Self>, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| Error::WriterStopped)?
    }

    /// How many transactions the writer has run: with concurrent writers,
    /// fewer than the writes (group commit). Shows that grouping happens
    /// (the store's tests check it).
    pub fn groups_committed(&self) -> u64 {
        self.writer.groups()
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        // A panic mid-read leaves the connection usable (reads change
        // nothing), so a poisoned lock is taken over.
        f(&self.reader.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Caps the database at `max_pages` pages (`PRAGMA max_page_count` on
    /// the write connection; 0 lifts the cap), as a quota would, and returns
    /// the cap in force. A test hook: writes past it fail as on a full disk,
    /// which is how the tests check that a full disk refuses cleanly and
    /// loses nothing.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the pragma fails.
    #[doc(hidden)]
    pub fn limit_pages(&self, max_pages: u64) -> Result<u64, Error> {
        let wanted = if max_pages == 0 {
            u64::from(u32::MAX) - 1
        } else {
            max_pages
        };
        self.write(move |tx| {
            tx.tx
                .query_row(&format!("PRAGMA max_page_count = {wanted}"), [], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(sqlite("set max_page_count"))
        })
    }

    /// Pages the database uses now (a test hook, with [`Store::limit_pages`]).
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the pragma fails.
    #[doc(hidden)]
    pub fn page_count(&self) -> Result<u64, Error> {
        self.read(|conn| {
            conn.query_row("PRAGMA page_count", [], |row| row.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(sqlite("read page_count"))
        })
    }

    /// Instances for listings: every live one, newest first, then, with
    /// `include_ended`, the `limit` that ended last, the latest end first
    /// (`limit` bounds the ended ones only; live ones are never left out).
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn instances(
        &self,
        include_ended: bool,
        limit: usize,
    ) -> Result<Vec<InstanceRecord>, Error> {
        self.read(|conn| instances::instances(conn, include_ended, limit))
    }

    /// Every live task of every instance, oldest start first.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn all_live_tasks(&self) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::live_tasks(conn, None))
    }

    /// The instances not yet ended, oldest first: what a restarted daemon
    /// must re-check.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn live_instances(&self) -> Result<Vec<InstanceRecord>, Error> {
        self.read(instances::live_instances)
    }

    /// One instance, live or ended.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>, Error> {
        self.read(|conn| instances::instance(conn, instance_id))
    }

    /// The live tasks of one instance, oldest first.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn live_tasks(&self, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::live_tasks(conn, Some(instance_id)))
    }

    /// Every task of an instance, live or ended, oldest first: its history,
    /// for operators.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn tasks_of(&self, instance_id: &str) -> Result<Vec<TaskRecord>, Error> {
        self.read(|conn| instances::tasks_of(conn, instance_id))
    }

    /// Every SVID still on record for an instance, oldest first, for
    /// operators.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn svids_of(&self, instance_id: &str) -> Result<Vec<SvidRecord>, Error> {
        self.read(|conn| svids::svids_of(conn, instance_id))
    }

    /// One SVID by serial (hex, any case), revoked or not.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, Error> {
        self.read(|conn| svids::svid(conn, serial))
    }

    /// Revoked SVIDs whose `not_after` is still in the future at `now`: what
    /// the CRL lists. Ordered by revocation time, then serial.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn revoked_unexpired(&self, now: SystemTime) -> Result<Vec<RevokedSvid>, Error> {
        self.read(|conn| svids::revoked_unexpired(conn, now))
    }

    /// Audit events matching `query`, oldest first; see [`AuditQuery`] for
    /// how `after_seq` and `limit` combine. Each carries its stored hash.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, Error> {
        self.read(|conn| audit::query(conn, query))
    }

    /// Checks the audit trail's hash chain, every row in `seq` order, in
    /// constant memory: reports the first row whose hash does not match its
    /// content and the previous row's hash, and the newest hash (the head).
    /// It reads a snapshot through a read connection of its own, so the
    /// daemon's other reads do not wait for a long trail to be walked.
    ///
    /// # Errors
    /// [`Error::Open`] if the read connection cannot be opened,
    /// [`Error::Sqlite`] if the read fails. A broken chain is not an error:
    /// it is in the verdict.
    pub fn verify_audit(&self) -> Result<AuditVerdict, Error> {
        let conn = open_reader(&self.path)?;
        chain::verify(&conn)
    }

    /// Registration entries created over the admin API, in creation order.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn stored_entries(&self) -> Result<Vec<StoredEntry>, Error> {
        self.read(entries::stored_entries)
    }

    /// A summary for status listings, as of now; see [`StoreStats`].
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn stats(&self) -> Result<StoreStats, Error> {
        self.stats_at(SystemTime::now())
    }

    /// As [`Store::stats`], counting SVIDs live or revoked-unexpired at `now`.
    ///
    /// # Errors
    /// [`Error::Sqlite`] if the read fails.
    pub fn stats_at(&self, now: SystemTime) -> Result<StoreStats, Error> {
        self.read(|conn| status::stats(conn, &self.path, now))
    }
}

/// The read connection: the same file, `query_only`, so a bug cannot write
/// behind the writer's back.
fn open_reader(path: &Path) -> Result<Connection, Error> {
    let fail = |e: rusqlite::Error| Error::Open {
        path: path.to_path_buf(),
        message: format!("cannot open a read connection: {e}"),
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.pragma_update(None, "query_only", true).map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    Ok(conn)
}

#[cfg(test)]
mod chain_tests;
#[cfg(test)]
mod tests;
