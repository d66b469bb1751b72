//! Who holds the client end of a connection: the /proc walk behind check 3
//! of `attest::socket`, and the batching that lets one walk answer for
//! every connection waiting on it.
//!
//! Owns: the walk over every fd table on the host (each process's, each
//! thread's private one, and the files registered in io_uring instances),
//! its 500 ms deadline, and [`HolderScans`], which groups concurrent checks.
//! Does not own: when a check is needed (`socket::needs_holder_scan`), nor
//! remembering a connection's verdict (the caller checks each connection at
//! most once).
//!
//! Why batching is sound: a copy of a client end that matters was made
//! before the connecting process was pinned (after the pin, an exec would
//! change the pinned program and refuse the connection; a copy the pinned
//! program makes itself is its own doing). So any walk that *starts* after
//! a connection's pin sees that copy, and a connection waiting for a walk
//! may be served by whichever walk starts next. A check that arrives while
//! a walk is under way waits for the next one (the running walk was not
//! looking for its inode), and that next walk looks for the inodes of all
//! the checks that arrived meanwhile, in one pass over /proc. A walk costs
//! the same for one inode or a thousand (one hash lookup per fd), so a
//! burst of new connections costs two walks of wall time, not one each.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Error;

/// Longest one walk of /proc may take; past it, every check it serves is
/// refused (fail closed: other users can make a walk long, with many threads
/// with private fd tables, and a walk that does not finish proves nothing).
pub const MAX_SCAN: Duration = Duration::from_millis(500);

/// One check: `pid` connected, and the client end of its connection is the
/// socket with inode `inode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Wanted {
    /// The connecting process.
    pub pid: u32,
    /// Inode of the client end of its connection.
    pub inode: u64,
}

/// Checks that the client end `client_inode` of `pid`'s connection is held
/// by `pid` and by no other process or thread: one walk for one check (see
/// [`walk`]). Blocking.
///
/// # Errors
/// As [`walk`].
pub fn check_sole_holder(pid: u32, client_inode: u64) -> Result<(), Error> {
    let wanted = Wanted {
        pid,
        inode: client_inode,
    };
    walk(&[wanted])
        .pop()
        .unwrap_or(Err(Error::HolderScanTooLong { pid }))
}

/// What a walk saw of one client end.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    by_caller: bool,
    other: Option<u32>,
}

/// Walks /proc once and gives, for each check of `batch` (in its order),
/// whether its pid alone holds its inode. A thread may have an fd table of
/// its own (unshare(CLONE_FILES)), so every thread's table is looked at, but
/// each table once: threads that share their process's table (kcmp(2) says
/// so) are skipped. Unreadable tables (a process that exited, or one a
/// non-root daemon may not inspect) count as not holding anything. Blocking.
///
/// # Errors
/// Per check: [`Error::NotHeldByCaller`] when its pid does not hold the
/// inode, [`Error::SharedConnection`] naming another holder,
/// [`Error::HolderScanTooLong`] when the walk passed [`MAX_SCAN`],
/// [`Error::ProcRead`] when /proc cannot be listed.
pub fn walk(batch: &[Wanted]) -> Vec<Result<(), Error>> {
    let started = Instant::now();
    let mut checks_of: HashMap<u64, Vec<usize>> = HashMap::with_capacity(batch.len());
    for (i, wanted) in batch.iter().enumerate() {
        checks_of.entry(wanted.inode).or_default().push(i);
    }
    let mut seen = vec![Seen::default(); batch.len()];
    let procs = match std::fs::read_dir("/proc") {
        Ok(procs) => procs,
        Err(e) => {
            let e = Arc::new(e);
            return batch
                .iter()
                .map(|w| {
                    Err(Error::ProcRead {
                        pid: w.pid,
                        what: "list of processes",
                        source: e.clone(),
                    })
                })
                .collect();
        }
    };
    for entry in procs.flatten() {
        if started.elapsed() > MAX_SCAN {
            let too_long = |w: &Wanted| Err(Error::HolderScanTooLong { pid: w.pid });
            return batch.iter().map(too_long).collect();
        }
        let Some(holder) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        for_each_held(holder, &checks_of, |inode| {
            for &i in checks_of.get(&inode).into_iter().flatten() {
                if holder == batch[i].pid {
                    seen[i].by_caller = true;
                } else {
                    seen[i].other.get_or_insert(holder);
                }
            }
        });
    }
    batch
        .iter()
        .zip(seen)
        .map(|(w, seen)| match seen {
            Seen {
                by_caller: false, ..
            } => Err(Error::NotHeldByCaller { pid: w.pid }),
            Seen {
                other: Some(holder),
                ..
            } => Err(Error::SharedConnection { pid: w.pid, holder }),
            Seen { .. } => Ok(()),
        })
        .collect()
}

/// Calls `found` with each inode of `wanted` that process `pid` holds, in
/// any of its fd tables (its own, or a thread's private one), directly or
/// as a file registered in an io_uring.
fn for_each_held<T>(pid: u32, wanted: &HashMap<u64, T>, mut found: impl FnMut(u64)) {
    let base = format!("/proc/{pid}");
    scan_table(&base, wanted, &mut found);
    let Ok(tasks) = std::fs::read_dir(format!("{base}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if tid != pid && crate::sys::same_fd_table(pid, tid) != Some(true) {
            scan_table(&format!("{base}/task/{tid}"), wanted, &mut found);
        }
    }
}

/// Looks through the fd table of `base` (`/proc/<pid>` or
/// `/proc/<pid>/task/<tid>`). The links are read relative to the open fd
/// directory into one reused buffer: this is the daemon's most repeated
/// /proc read.
fn scan_table<T>(base: &str, wanted: &HashMap<u64, T>, found: &mut impl FnMut(u64)) {
    use rustix::fs::{Dir, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(dir_fd) = rustix::fs::open(format!("{base}/fd"), flags, Mode::empty()) else {
        return;
    };
    let Ok(entries) = Dir::read_from(&dir_fd) else {
        return;
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        let Ok((link, _)) = rustix::fs::readlinkat_raw(&dir_fd, name, &mut buf) else {
            continue;
        };
        if let Some(inode) = socket_inode(link).filter(|i| wanted.contains_key(i)) {
            found(inode);
        } else if link == IO_URING.as_bytes() {
            for inode in ring_sockets(base, name) {
                if wanted.contains_key(&inode) {
                    found(inode);
                }
            }
        }
    }
}

/// The inode in a link `socket:[<inode>]`.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// What /proc shows as the link of an io_uring instance's fd.
const IO_URING: &str = "anon_inode:[io_uring]";

/// The sockets registered as fixed files in the io_uring instance at fd
/// `name` of `base`'s table: such a file is in no fd table, yet the ring's
/// owner can read from it. Its fdinfo lists them (`<n>: socket:[<inode>]`).
fn ring_sockets(base: &str, name: &CStr) -> Vec<u64> {
    let fdinfo = format!("{base}/fdinfo/{}", name.to_string_lossy());
    let Ok(info) = std::fs::read_to_string(fdinfo) else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split_once(": "))
        .filter_map(|(_, file)| socket_inode(file.as_bytes()))
        .collect()
}

/// What answers a batch of checks: [`walk`], or a stand-in in tests.
type WalkFn = dyn Fn(&[Wanted]) -> Vec<Result<(), Error>> + Send + Sync;

/// Concurrent holder checks, served by shared walks of /proc: at most one
/// walk runs at a time, and each walk answers every check that was waiting
/// when it started. One per daemon (cheap to clone).
#[derive(Clone)]
pub struct HolderScans {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<Queue>,
    walk: Box<WalkFn>,
}

/// Checks waiting for the next walk, and whether a walker is running.
#[derive(Default)]
struct Queue {
    waiting: Vec<(Wanted, oneshot::Sender<Result<(), Error>>)>,
    walking: bool,
}

impl Default for HolderScans {
    fn default() -> Self {
        Self::with_walk(walk)
    }
}

impl std::fmt::Debug for HolderScans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderScans").finish_non_exhaustive()
    }
}

impl HolderScans {
    fn with_walk(
        walk: impl Fn(&[Wanted]) -> Vec<Result<(), Error>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                walk: Box::new(walk),
            }),
        }
    }

    /// Checks that `pid` alone holds the client end `inode` of its
    /// connection, with the next walk of /proc to start (shared with every
    /// other check waiting for it). The walk runs on tokio's blocking pool.
    /// Call it once per connection, after the connection was pinned.
    ///
    /// # Errors
    /// As [`walk`]; [`Error::HolderScanTooLong`] also when the walk could
    /// not run (the runtime is shutting down).
    pub async fn check(&self, pid: u32, inode: u64) -> Result<(), Error> {
        let (reply, verdict) = oneshot::channel();
        let start_walker = {
            let mut queue = self.shared.lock();
            queue.waiting.push((Wanted { pid, inode }, reply));
            !std::mem::replace(&mut queue.walking, true)
        };
        if start_walker {
            let walker = Walker {
                shared: self.shared.clone(),
                running: true,
            };
            // Dropped unrun when the runtime shuts down: the walker's Drop
            // then refuses the waiting checks.
            drop(tokio::task::spawn_blocking(move || walker.run()));
        }
        verdict
            .await
            .unwrap_or(Err(Error::HolderScanTooLong { pid }))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is a list and a flag, each changed in one step, so a
        // poisoned lock still holds a consistent one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Walks while checks are waiting; the only one running for its
/// [`HolderScans`].
struct Walker {
    shared: Arc<Shared>,
    running: bool,
}

impl Walker {
    fn run(mut self) {
        let mut last_walk = None;
        loop {
            // Back-to-back walks (checks queued during the last one: a burst
            // of new connections) pause for twice the last walk's time
            // first: the walker then takes at most a third of one core, a
            // check waits at most about three walks, and the pause gathers
            // more checks into the next walk. A lone check never waits.
            if let Some(took) = last_walk.take()
                && !self.shared.lock().waiting.is_empty()
            {
                std::thread::sleep(walk_gap(took));
            }
            let batch = {
                let mut queue = self.shared.lock();
                if queue.waiting.is_empty() {
                    queue.walking = false;
                    self.running = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let wanted: Vec<Wanted> = batch.iter().map(|(w, _)| *w).collect();
            let started = std::time::Instant::now();
            let verdicts = (self.shared.walk)(&wanted);
            last_walk = Some(started.elapsed());
            // A missing verdict drops its sender: that check is refused.
            for ((_, reply), verdict) in batch.into_iter().zip(verdicts) {
                let _ = reply.send(verdict);
            }
        }
    }
}

/// Longest pause between two walks.
const MAX_WALK_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The pause before a walk that follows one that took `took`.
fn walk_gap(took: std::time::Duration) -> std::time::Duration {
    (took * 2).min(MAX_WALK_GAP)
}

impl Drop for Walker {
    /// A walker that did not finish (it panicked, or never ran) refuses its
    /// batch and every check queued until now (their senders are dropped:
    /// fail closed), and lets the next check start a walker again.
    fn drop(&mut self) {
        if self.running {
            let mut queue = self.shared.lock();
            queue.waiting.clear();
            queue.walking = false;
        }
    }
}

#[cfg(test)]
mod tests;
