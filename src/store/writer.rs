//! The store's one writer: a dedicated thread that owns the write
//! connection and commits what concurrent callers ask for in groups.
//!
//! Every write is a job (a closure over a [`Tx`]). The thread takes the
//! first job waiting, then every other job already queued (up to
//! [`MAX_BATCH`]), runs each inside its own SAVEPOINT of one `BEGIN
//! IMMEDIATE` transaction, commits once (one fsync for the group), and only
//! then answers each caller. So:
//! - a caller that gets `Ok` has its rows on disk: nothing is acknowledged
//!   before the commit that holds it (the daemon hands out an SVID only
//!   after its row is acknowledged);
//! - a job that fails rolls back to its savepoint alone: the others in the
//!   group still commit;
//! - if the commit itself fails, every job of the group gets the error and
//!   none of them is acknowledged.
//!
//! Callers wait on a channel, never on a lock: async callers `.await` their
//! answer, and room in the queue when [`QUEUE`] of their writes are
//! waiting (no runtime worker blocks on disk or on the queue); blocking
//! callers (tests and tools) block on a std channel.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{Error, Tx, sqlite};

/// Most jobs committed in one transaction: bounds how long one commit holds
/// the write lock and how much one failed commit takes down with it.
pub(crate) const MAX_BATCH: usize = 256;

/// Writes queued by async callers before more wait (asynchronously) for
/// room: bounds memory under a flood without blocking a runtime thread.
const QUEUE: usize = 4096;

/// A job as the writer thread sees it: run inside the group's transaction,
/// then told how the group's commit went.
trait Job: Send {
    /// Runs the caller's closure; `true` if it succeeded (its savepoint is
    /// kept), `false` if it failed (rolled back).
    fn run(&mut self, tx: &Tx<'_>) -> bool;
    /// Answers the caller once the group's fate is known.
    fn finish(self: Box<Self>, commit: Result<(), &Error>);
}

/// Where a job's answer goes.
enum Reply<T> {
    Async(oneshot::Sender<Result<T, Error>>),
    Blocking(mpsc::SyncSender<Result<T, Error>>),
}

struct TypedJob<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, Error>>,
    reply: Reply<T>,
    /// The async caller's room in the queue, given back once answered.
    _room: Option<OwnedSemaphorePermit>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
{
    fn run(&mut self, tx: &Tx<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A panicking job must not take the writer (and every later write)
        // down with it: it fails alone, like any other job.
        let outcome = catch_unwind(AssertUnwindSafe(|| work(tx))).unwrap_or_else(|_| {
            tracing::error!("a store write panicked; it was rolled back");
            Err(Error::WritePanicked)
        });
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), &Error>) {
        let outcome = match (self.outcome, commit) {
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Err(e)) => Err(e.clone()),
            (None, Err(e)) => Err(e.clone()),
            // Not reachable: every job of a committed group was run.
            (None, Ok(())) => Err(Error::WritePanicked),
        };
        match self.reply {
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// The handle to the writer thread; dropping it lets the thread finish the
/// queued jobs, close the connection and exit (the drop waits for that).
pub(crate) struct Writer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    room: Arc<Semaphore>,
    thread: Option<JoinHandle<()>>,
    groups: Arc<AtomicU64>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub(crate) fn start(conn: Connection, path: PathBuf) -> Result<Self, Error> {
        let (jobs, queue) = mpsc::channel();
        let groups = Arc::new(AtomicU64::new(0));
        let counter = groups.clone();
        let thread = std::thread::Builder::new()
            .name("sigil-store".to_owned())
            .spawn(move || run(conn, &queue, &counter))
            .map_err(|e| Error::Open {
                path,
                message: format!("cannot start the store's writer thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(jobs),
            room: Arc::new(Semaphore::new(QUEUE)),
            thread: Some(thread),
            groups,
        })
    }

    /// How many groups (transactions) the writer has committed or tried.
    pub(crate) fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Queues `work` and waits, blocking this thread, until its group is
    /// committed (or failed).
    pub(crate) fn write<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(work, Reply::Blocking(tx), None)?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Queues `work` and waits, without blocking a thread, until its group
    /// is committed (or failed).
    pub(crate) async fn write_async<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
    {
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopped())?;
        let (tx, rx) = oneshot::channel();
        self.enqueue(work, Reply::Async(tx), Some(room))?;
        rx.await.map_err(|_| stopped())?
    }

    fn enqueue<T, F>(
        &self,
        work: F,
        reply: Reply<T>,
        room: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Error>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T, Error> + Send + 'static,
    {
        let job = Box::new(TypedJob {
            work: Some(work),
            outcome: None,
            reply,
            _room: room,
        });
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> Error {
    Error::WriterStopped
}

/// The writer thread: one group per iteration until every sender is gone.
fn run(mut conn: Connection, queue: &mpsc::Receiver<Box<dyn Job>>, groups: &AtomicU64) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        commit_group(&mut conn, group);
        groups.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs one savepoint statement (prepared once, cached by the connection).
fn statement(tx: &Tx<'_>, sql: &str) -> Result<(), Error> {
    tx.tx
        .prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
        .map_err(sqlite("manage a savepoint"))
}

/// Commits a group's transaction, timed for the metrics (the COMMIT and
/// its fsync, failed or not).
fn commit(tx: Tx<'_>) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let committed = tx.tx.commit().map_err(sqlite("commit a transaction"));
    crate::metrics::global().commit(started.elapsed());
    committed
}

/// Runs `group` in one transaction, each job in its own savepoint, commits
/// once, then answers every job.
fn commit_group(conn: &mut Connection, mut group: Vec<Box<dyn Job>>) {
    let committed = (|| {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite("begin a transaction"))?;
        let tx = Tx { tx };
        if let [job] = group.as_mut_slice() {
            // Alone in its group: the transaction is its savepoint.
            if !job.run(&tx) {
                return tx.tx.rollback().map_err(sqlite("roll back a transaction"));
            }
            return commit(tx);
        }
        for job in &mut group {
            statement(&tx, "SAVEPOINT job")?;
            if job.run(&tx) {
                statement(&tx, "RELEASE job")?;
            } else {
                statement(&tx, "ROLLBACK TO job")?;
                statement(&tx, "RELEASE job")?;
            }
        }
        commit(tx)
    })();
    if let Err(e) = &committed {
        tracing::warn!(error = %e, jobs = group.len(), "a group of store writes failed; none of them was acknowledged");
    }
    for job in group {
        job.finish(committed.as_ref().copied());
    }
}
