//! Attestation: who is on the other end of a connection, from the kernel's facts.
//!
//! Owns: peer credentials → process facts → selectors, the instance id, and
//! the checks that stop a recycled PID from taking another process's
//! identity. Does not own: which entries match (that is `policy`), nor any
//! gRPC type. Everything here is blocking /proc I/O; async callers use
//! `spawn_blocking` (the exit watch, which waits on a pidfd, and the
//! holder-scan batching, which waits for a shared walk, are async).
//!
//! Files: `socket` (the kernel's facts about a connection), `holders` (who
//! else holds it), `process` (/proc facts of a process), `cache` (an
//! attestation reused while those facts hold), `selectors`, `exit_watch`.

mod cache;
pub mod exit_watch;
pub mod holders;
pub mod process;
pub mod selectors;
pub mod socket;

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use nix::unistd::{Gid, Group, Uid, User};

use crate::ids::InstanceId;
pub use process::{DigestCache, ProcessFacts};
pub use selectors::{Selector, SelectorKind};
pub use socket::ExeId;

/// Why a process could not be attested. Each is a refusal: the caller gets
/// no identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The process exited (before or during attestation).
    #[error("process {pid} has exited")]
    ProcessGone {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The process at this pid is not the one that started being attested.
    #[error("process {pid} changed while it was being attested (it exited or its pid was reused)")]
    ProcessChanged {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The process at this pid started after the connection was made, so it
    /// cannot be the process that connected: its pid was reused.
    #[error("process {pid} started after the connection was made: its pid was reused; refusing")]
    StartedAfterConnect {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The process at this pid is not the one that connected (its pidfd
    /// says the connecting process had another start time).
    #[error("process {pid} is not the process that connected: its pid was reused; refusing")]
    PidReused {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The process's uid is not the uid it connected with.
    #[error("process {pid} connected as uid {peer_uid} but now runs as uid {proc_uid}; refusing")]
    CredentialsChanged {
        /// The pid the connection came from.
        pid: u32,
        /// uid from SO_PEERCRED at connect time.
        peer_uid: u32,
        /// Effective uid in /proc now.
        proc_uid: u32,
    },
    /// The process runs another program than the one that connected.
    #[error(
        "process {pid} executed another program after it connected; a connection belongs to the program that opened it, so open a new one"
    )]
    ExecutedAfterConnect {
        /// The pid the connection came from.
        pid: u32,
    },
    /// Bytes on the connection were written by a process that did not
    /// connect (it inherited the socket, or was passed it).
    #[error(
        "bytes on the connection of process {pid} were written by process {writer}; a connection may be used only by the process that opened it"
    )]
    ForeignWriter {
        /// The pid the connection came from.
        pid: u32,
        /// The pid that wrote bytes on it.
        writer: u32,
    },
    /// Another process holds the client end of the connection, so it could
    /// read an SVID's private key.
    #[error(
        "the connection of process {pid} is also held by process {holder}; an SVID and its key go only to the process that connected"
    )]
    SharedConnection {
        /// The pid the connection came from.
        pid: u32,
        /// Another process holding the client end.
        holder: u32,
    },
    /// The scan for other holders of a connection did not finish in time.
    #[error(
        "cannot tell in time who else holds the connection of process {pid}; refusing to send a private key (retry)"
    )]
    HolderScanTooLong {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The connecting process could not be pinned when it connected, so
    /// nothing ties the connection to a program.
    #[error(
        "the program of process {pid} could not be read when it connected (a binary on another user's FUSE mount?), so no private key goes over that connection"
    )]
    NotPinned {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The kernel could not name the client end of the connection.
    #[error(
        "the kernel's sock_diag cannot name the client end of the connection of process {pid}; refusing to send a private key"
    )]
    NoClientEnd {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The connecting process no longer holds its end of the connection.
    #[error(
        "process {pid} no longer holds the connection it opened (it was closed across an exec or handed to another process)"
    )]
    NotHeldByCaller {
        /// The pid the connection came from.
        pid: u32,
    },
    /// The connection carries no peer credentials.
    #[error("the connection carries no peer credentials (only Unix socket peers can be attested)")]
    NoPeerCredentials,
    /// A /proc file could not be read.
    #[error(
        "cannot read the {what} of process {pid}: {source} (attesting another user's processes needs root with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH; a daemon that is not root attests only its own user's)"
    )]
    ProcRead {
        /// The pid being attested.
        pid: u32,
        /// Which fact was being read.
        what: &'static str,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// The boot id could not be read.
    #[error("cannot read the boot id from {BOOT_ID_PATH}: {0}")]
    BootId(Arc<io::Error>),
}

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's word on who connected: from SO_PEERCRED, captured when the
/// connection was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id of the process that called connect(2).
    pub pid: u32,
    /// Its effective uid at connect time.
    pub uid: u32,
    /// Its effective gid at connect time.
    pub gid: u32,
    /// When the connection was accepted, in clock ticks since boot (the unit
    /// of `/proc/<pid>/stat`'s start time), if known.
    pub accepted_at_ticks: Option<u64>,
    /// The start time of the very process that connected, pinned through
    /// its pidfd (SO_PEERPIDFD, Linux 6.5+) when the connection was accepted.
    /// With it, a recycled pid is refused exactly; without it, attestation
    /// falls back on `accepted_at_ticks`.
    pub start_time: Option<u64>,
    /// The program the connecting process ran when the connection was
    /// accepted; a process running another one now is refused.
    pub exe: Option<ExeId>,
    /// A process other than the connecting one that wrote bytes on the
    /// connection, if any: every request on it is refused.
    pub foreign_writer: Option<u32>,
}

impl PeerCred {
    /// The credentials attestation works from, built from the kernel's facts
    /// about an accepted connection and the first process other than the
    /// connecting one seen writing on it (if any). The one place these are
    /// put together. `None` when the kernel named no connecting pid.
    pub fn from_accepted(accepted: &socket::Accepted, foreign_writer: Option<u32>) -> Option<Self> {
        Some(Self {
            pid: accepted.cred.pid?,
            uid: accepted.cred.uid,
            gid: accepted.cred.gid,
            accepted_at_ticks: Some(accepted.cred.accepted_at_ticks),
            start_time: accepted.pinned.map(|p| p.start_time),
            exe: accepted.pinned.map(|p| p.exe),
            foreign_writer,
        })
    }
}

#[cfg(test)]
impl PeerCred {
    /// This process as a peer that connected just now, nothing pinned.
    pub(crate) fn this_process() -> Self {
        Self {
            pid: std::process::id(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            accepted_at_ticks: Some(now_in_ticks()),
            start_time: None,
            exe: None,
            foreign_writer: None,
        }
    }
}

/// An attested process: who it is and the selectors it was found to have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// The instance this process is.
    pub instance_id: InstanceId,
    /// The facts the selectors were made from.
    pub facts: ProcessFacts,
    /// The selectors, sorted.
    pub selectors: BTreeSet<Selector>,
}

/// Attests processes. One per daemon: it holds the boot id and the caches
/// (digests of programs, attestations per process, user and group names).
pub struct Attestor {
    boot_id: String,
    digests: DigestCache,
    attestations: cache::AttestCache,
    names: cache::NameCache,
    /// Attestations built from scratch (not from the cache), for tests.
    #[cfg(test)]
    built: std::sync::atomic::AtomicUsize,
}

impl Attestor {
    /// Reads the boot id, which makes instance ids unique across reboots.
    ///
    /// # Errors
    /// [`Error::BootId`] when /proc is not mounted or unreadable.
    pub fn new() -> Result<Self, Error> {
        let boot_id = std::fs::read_to_string(BOOT_ID_PATH)
            .map_err(|e| Error::BootId(Arc::new(e)))?
            .trim()
            .to_owned();
        Ok(Self {
            boot_id,
            digests: DigestCache::default(),
            attestations: cache::AttestCache::default(),
            names: cache::NameCache::default(),
            #[cfg(test)]
            built: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The boot id instance ids are derived with (a restarted daemon compares
    /// it to tell a live instance from one of a previous boot).
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Attests the process that made a connection. Blocking. An
    /// attestation of the same process is reused while none of its facts
    /// has changed (see `cache`); the checks against `peer` are made every
    /// time.
    ///
    /// # Errors
    /// A refusal when the process is gone, changed, reused a pid, changed uid
    /// since connecting, or cannot be read.
    pub fn attest(&self, peer: &PeerCred) -> Result<Attestation, Error> {
        let pid = peer.pid;
        if let Some(writer) = peer.foreign_writer {
            return Err(Error::ForeignWriter { pid, writer });
        }
        let (dir, snapshot) = self.snapshot(pid)?;
        let start = snapshot.start_time;
        if peer.start_time.is_some_and(|pinned| pinned != start) {
            return Err(Error::PidReused { pid });
        }
        if let Some(accepted) = peer.accepted_at_ticks {
            // One tick of slack: start times are rounded down to a tick.
            if start > accepted.saturating_add(1) {
                return Err(Error::StartedAfterConnect { pid });
            }
        }
        let attestation = self.attest_process(&dir, snapshot)?;
        // The facts are of one program, the one running now (checked last
        // in `attest_process`); it must be the one that connected.
        if peer
            .exe
            .is_some_and(|pinned| pinned != attestation.facts.exe_id)
        {
            return Err(Error::ExecutedAfterConnect { pid });
        }
        if attestation.facts.uid != peer.uid {
            return Err(Error::CredentialsChanged {
                pid,
                peer_uid: peer.uid,
                proc_uid: attestation.facts.uid,
            });
        }
        Ok(attestation)
    }

    /// Attests again a process attested before (same pid and start time),
    /// to see whether it still is what it was: it may have changed uid, or
    /// exec'd another program, which makes it another instance (the caller
    /// compares the instance id). Blocking.
    ///
    /// # Errors
    /// As [`Attestor::attest`]; [`Error::ProcessChanged`] if the pid now names
    /// another process.
    pub fn reattest(&self, pid: u32, start_time: u64) -> Result<Attestation, Error> {
        let (dir, snapshot) = self.snapshot(pid)?;
        if snapshot.start_time != start_time {
            self.attestations.forget(pid);
            return Err(Error::ProcessChanged { pid });
        }
        self.attest_process(&dir, snapshot)
    }

    /// Opens the /proc directory of `pid` and reads its snapshot; a process
    /// found gone is forgotten.
    fn snapshot(&self, pid: u32) -> Result<(process::ProcDir, process::Snapshot), Error> {
        let read = process::ProcDir::open(pid).and_then(|dir| Ok((dir.snapshot()?, dir)));
        match read {
            Ok((snapshot, dir)) => Ok((dir, snapshot)),
            Err(e) => {
                if matches!(e, Error::ProcessGone { .. }) {
                    self.attestations.forget(pid);
                }
                Err(e)
            }
        }
    }

    /// The attestation of the process `snapshot` was just read from
    /// (through `dir`): the cached one if its facts still hold, or one built
    /// from `snapshot`.
    fn attest_process(
        &self,
        dir: &process::ProcDir,
        snapshot: process::Snapshot,
    ) -> Result<Attestation, Error> {
        let (pid, exe_id) = (snapshot.pid, snapshot.exe_id);
        let (attestation, cached) = match self.attestations.get(&snapshot) {
            Some(a) => (a, true),
            None => (self.build(&snapshot)?, false),
        };
        // Read the program last, through the directory the snapshot was
        // read from: it succeeds only if that very process is still alive
        // (so the digest, read by pid, was of it too), and an exec while the
        // facts were read, which would mix two programs' facts, is seen.
        if dir.exe()?.0 != exe_id {
            self.attestations.forget(pid);
            return Err(Error::ProcessChanged { pid });
        }
        if !cached {
            self.attestations.insert(snapshot, attestation.clone());
        }
        Ok(attestation)
    }

    /// Builds an attestation from scratch: the digest (cached per file),
    /// the names (cached per id) and the selectors.
    fn build(&self, snapshot: &process::Snapshot) -> Result<Attestation, Error> {
        #[cfg(test)]
        self.built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let facts = snapshot.facts(self.digests.digest_of_exe(snapshot.pid)?)?;
        let selectors = selectors_named(
            &facts,
            self.names.user(facts.uid),
            self.names.group(facts.gid),
        );
        Ok(Attestation {
            instance_id: InstanceId::derive(
                &self.boot_id,
                snapshot.pid,
                snapshot.start_time,
                snapshot.exe_id,
            ),
            facts,
            selectors,
        })
    }

    /// Drops the cached attestation of `pid` (say, when it exited); its
    /// next attestation is built from scratch.
    pub fn forget(&self, pid: u32) {
        self.attestations.forget(pid);
    }

    /// Processes with a cached attestation now.
    pub fn cached(&self) -> usize {
        self.attestations.len()
    }
}

/// Turns process facts into selectors. Names are looked up through NSS; a
/// uid with no name simply has no `unix:user` selector.
pub fn selectors_of(facts: &ProcessFacts) -> BTreeSet<Selector> {
    let user = User::from_uid(Uid::from_raw(facts.uid)).ok().flatten();
    let group = Group::from_gid(Gid::from_raw(facts.gid)).ok().flatten();
    selectors_named(facts, user.map(|u| u.name), group.map(|g| g.name))
}

/// [`selectors_of`], with the user and group names already looked up.
fn selectors_named(
    facts: &ProcessFacts,
    user: Option<String>,
    group: Option<String>,
) -> BTreeSet<Selector> {
    use SelectorKind as K;
    let mut set = BTreeSet::new();
    set.insert(Selector::new(K::UnixUid, facts.uid.to_string()));
    set.insert(Selector::new(K::UnixGid, facts.gid.to_string()));
    if let Some(user) = user {
        set.insert(Selector::new(K::UnixUser, user));
    }
    if let Some(group) = group {
        set.insert(Selector::new(K::UnixGroup, group));
    }
    for gid in &facts.supplementary_gids {
        set.insert(Selector::new(K::UnixSupplementaryGid, gid.to_string()));
    }
    set.insert(Selector::new(K::UnixPath, facts.exe.to_string_lossy()));
    set.insert(Selector::new(K::UnixSha256, facts.exe_sha256.clone()));
    if let Some(parent) = &facts.parent_exe {
        set.insert(Selector::new(K::UnixParentPath, parent.to_string_lossy()));
    }
    for path in &facts.cgroups {
        set.insert(Selector::new(K::CgroupPath, path.clone()));
        if let Some(id) = process::container_id(path) {
            set.insert(Selector::new(K::ContainerId, id));
        }
        if let Some(unit) = process::systemd_unit(path) {
            set.insert(Selector::new(K::SystemdUnit, unit));
        }
    }
    set
}

/// Clock ticks since boot now: the unit of a process's start time, so a
/// connection's accept time can be compared with it.
pub fn now_in_ticks() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let tps = procfs::ticks_per_second();
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(tps) + nanos.saturating_mul(tps) / 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> PeerCred {
        PeerCred::this_process()
    }

    #[test]
    fn this_process_attests_with_its_uid_path_and_digest() {
        let attestor = Attestor::new().unwrap();
        let a = attestor.attest(&me()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let path = Selector::new(SelectorKind::UnixPath, exe.to_string_lossy());
        assert!(a.selectors.contains(&path));
        let uid = Selector::new(SelectorKind::UnixUid, me().uid.to_string());
        assert!(a.selectors.contains(&uid));
        assert!(
            a.selectors
                .iter()
                .any(|s| s.kind() == SelectorKind::UnixSha256)
        );
        let again = attestor.attest(&me()).unwrap();
        assert_eq!(
            a.instance_id, again.instance_id,
            "same process, same instance"
        );
    }

    #[test]
    fn a_process_that_started_after_the_connection_is_refused() {
        let attestor = Attestor::new().unwrap();
        let peer = PeerCred {
            accepted_at_ticks: Some(0),
            ..me()
        };
        let err = attestor.attest(&peer).unwrap_err();
        assert!(matches!(err, Error::StartedAfterConnect { .. }), "{err}");
    }

    #[test]
    fn a_process_other_than_the_pinned_one_is_refused() {
        let attestor = Attestor::new().unwrap();
        let start = process::start_time(std::process::id()).unwrap();
        let reused = PeerCred {
            start_time: Some(start + 1),
            ..me()
        };
        let err = attestor.attest(&reused).unwrap_err();
        assert!(matches!(err, Error::PidReused { .. }), "{err}");
        let pinned = PeerCred {
            start_time: Some(start),
            ..me()
        };
        assert!(attestor.attest(&pinned).is_ok());
    }

    #[test]
    fn a_process_running_another_program_than_at_connect_is_refused() {
        let attestor = Attestor::new().unwrap();
        let ours = socket::exe_id(std::process::id()).unwrap();
        let exec = PeerCred {
            exe: Some(ExeId {
                ino: ours.ino.wrapping_add(1),
                ..ours
            }),
            ..me()
        };
        let err = attestor.attest(&exec).unwrap_err();
        assert!(matches!(err, Error::ExecutedAfterConnect { .. }), "{err}");
        let same = PeerCred {
            exe: Some(ours),
            ..me()
        };
        assert!(attestor.attest(&same).is_ok());
    }

    #[test]
    fn bytes_written_by_another_process_are_refused_before_any_proc_read() {
        let attestor = Attestor::new().unwrap();
        let peer = PeerCred {
            foreign_writer: Some(1),
            ..me()
        };
        let err = attestor.attest(&peer).unwrap_err();
        assert!(
            matches!(err, Error::ForeignWriter { writer: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_uid_other_than_the_connecting_one_is_refused() {
        let attestor = Attestor::new().unwrap();
        let peer = PeerCred {
            uid: me().uid.wrapping_add(1),
            ..me()
        };
        let err = attestor.attest(&peer).unwrap_err();
        assert!(matches!(err, Error::CredentialsChanged { .. }), "{err}");
    }

    #[test]
    fn an_accepted_connection_gives_the_credentials_of_its_pinned_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = socket::SocketCred::read(&a).unwrap();
        let accepted = socket::Accepted::read(&a, cred);
        let peer = PeerCred::from_accepted(&accepted, None).unwrap();
        let start = process::start_time(std::process::id()).unwrap();
        assert_eq!(
            peer,
            PeerCred {
                accepted_at_ticks: Some(cred.accepted_at_ticks),
                start_time: Some(start),
                exe: Some(socket::exe_id(std::process::id()).unwrap()),
                ..me()
            }
        );
        assert!(accepted.client_inode.is_some());
        let written = PeerCred::from_accepted(&accepted, Some(1)).unwrap();
        assert_eq!(written.foreign_writer, Some(1));
        let unnamed = socket::Accepted {
            cred: socket::SocketCred { pid: None, ..cred },
            ..accepted
        };
        assert_eq!(PeerCred::from_accepted(&unnamed, None), None);
    }

    fn builds(attestor: &Attestor) -> usize {
        attestor.built.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_known_process_is_attested_from_the_cache_and_still_checked_against_its_connection() {
        let attestor = Attestor::new().unwrap();
        let first = attestor.attest(&me()).unwrap();
        let again = attestor.attest(&me()).unwrap();
        assert_eq!(first, again);
        assert_eq!(builds(&attestor), 1, "built once, then reused");
        let start = first.facts.start_time;
        assert_eq!(attestor.reattest(first.facts.pid, start).unwrap(), first);
        assert_eq!(builds(&attestor), 1);
        // The connection's checks are not cached.
        let other_uid = PeerCred {
            uid: me().uid.wrapping_add(1),
            ..me()
        };
        assert!(matches!(
            attestor.attest(&other_uid),
            Err(Error::CredentialsChanged { .. })
        ));
        assert_eq!(attestor.cached(), 1);
    }

    /// A python child that runs each line it reads as a statement, then
    /// answers "ok".
    struct Child(
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
    );

    impl Child {
        fn spawn() -> Self {
            let script = "import os, sys\nfor line in sys.stdin:\n    exec(line)\n    print('ok', flush=True)\n";
            let mut child = std::process::Command::new("python3")
                .args(["-c", script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut child = Self(child, out);
            // `python3` may be a shim that execs the interpreter: wait for it.
            child.run("pass");
            child
        }

        fn run(&mut self, statement: &str) {
            use std::io::{BufRead, Write};
            let stdin = self.0.stdin.as_mut().unwrap();
            writeln!(stdin, "{statement}").unwrap();
            let mut line = String::new();
            self.1.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ok", "{statement}");
        }

        fn peer(&self) -> PeerCred {
            PeerCred {
                pid: self.0.id(),
                ..me()
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_change_of_groups_or_program_is_seen_at_the_next_attestation() {
        let attestor = Attestor::new().unwrap();
        let mut child = Child::spawn();
        let before = attestor.attest(&child.peer()).unwrap();
        assert_eq!(attestor.attest(&child.peer()).unwrap(), before);
        assert_eq!(builds(&attestor), 1);
        if nix::unistd::geteuid().is_root() {
            // Without an exec: new supplementary groups and egid.
            child.run("os.setgroups([4242]); os.setegid(4243)");
            let after = attestor.attest(&child.peer()).unwrap();
            assert_eq!(builds(&attestor), 2);
            assert_eq!(after.facts.supplementary_gids, vec![4242]);
            assert_eq!(after.facts.gid, 4243);
            let gid = Selector::new(SelectorKind::UnixGid, "4243");
            assert!(after.selectors.contains(&gid));
            assert_eq!(after.instance_id, before.instance_id, "same program");
        } else {
            eprintln!("skipped the setgroups part: needs root");
        }
        // An exec of another program: another instance.
        let sleep = std::fs::canonicalize("/usr/bin/sleep").unwrap();
        let exec = format!("os.execv({:?}, ['sleep', '30'])", sleep.to_string_lossy());
        use std::io::Write;
        writeln!(child.0.stdin.as_mut().unwrap(), "{exec}").unwrap();
        let exec_d = std::time::Instant::now();
        let after = loop {
            let a = attestor.attest(&child.peer()).unwrap();
            if a.facts.exe == sleep || exec_d.elapsed() > std::time::Duration::from_secs(5) {
                break a;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(after.facts.exe, sleep);
        assert_ne!(after.instance_id, before.instance_id);
    }

    #[test]
    fn reattesting_with_a_wrong_start_time_is_refused() {
        let attestor = Attestor::new().unwrap();
        let a = attestor.attest(&me()).unwrap();
        let err = attestor
            .reattest(a.facts.pid, a.facts.start_time + 1)
            .unwrap_err();
        assert!(matches!(err, Error::ProcessChanged { .. }), "{err}");
        assert!(attestor.reattest(a.facts.pid, a.facts.start_time).is_ok());
    }
}
