//! Facts about a process, read from /proc.
//!
//! Everything here comes from the kernel: the exe link, its content, status,
//! stat and cgroup files, read through one open `/proc/<pid>` directory
//! ([`ProcDir`]) into a [`Snapshot`]. Nothing a client sends is consulted. Reading another
//! user's `/proc/<pid>/exe` needs privilege, so a daemon that runs as a normal
//! user can attest only that user's processes, and says so.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::Error;

/// What /proc says about one process at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessFacts {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot; with the pid it names the process.
    pub start_time: u64,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary gids.
    pub supplementary_gids: Vec<u32>,
    /// Executable path as the kernel reports it (` (deleted)` when replaced).
    pub exe: PathBuf,
    /// SHA-256 of the executable the process runs, lower-case hex.
    pub exe_sha256: String,
    /// The executable's inode: which program this is.
    pub exe_id: crate::ids::ExeId,
    /// Executable of the parent, when readable.
    pub parent_exe: Option<PathBuf>,
    /// Cgroup paths, one per hierarchy (one on cgroup v2).
    pub cgroups: Vec<String>,
}

/// Reads the start time of `pid`: the value that tells one process from a
/// later one with the same pid.
///
/// # Errors
/// [`Error::ProcessGone`] when there is no such process.
pub fn start_time(pid: u32) -> Result<u64, Error> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).map_err(|e| io_error(pid, "stat", e))?;
    parse_stat(&text)
        .map(|(_, start)| start)
        .ok_or_else(|| malformed(pid, "stat"))
}

/// The processes above `pid`, nearest first, as (pid, start time), up to
/// `max` of them or to pid 1; stops early where /proc cannot be read (a
/// process that exited meanwhile).
pub fn ancestors(pid: u32, max: usize) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut at = pid;
    while out.len() < max {
        let Some((ppid, _)) = std::fs::read(format!("/proc/{at}/stat"))
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            break;
        };
        if ppid == 0 {
            break;
        }
        let Ok(start) = start_time(ppid) else { break };
        out.push((ppid, start));
        if ppid == 1 {
            break;
        }
        at = ppid;
    }
    out
}

/// Who a process is, as `/proc/<pid>/status` says now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
}

/// The effective uid and gid and the supplementary groups of `pid`.
///
/// # Errors
/// [`Error::ProcessGone`] or [`Error::ProcRead`].
pub fn groups(pid: u32) -> Result<Groups, Error> {
    let text =
        std::fs::read(format!("/proc/{pid}/status")).map_err(|e| io_error(pid, "status", e))?;
    let (uids, gids, groups) = parse_status(&text).ok_or_else(|| malformed(pid, "status"))?;
    Ok(Groups {
        uid: uids[1],
        gid: gids[1],
        groups,
    })
}

/// Collects every fact about `pid` that selectors are made from.
///
/// # Errors
/// [`Error::ProcessGone`] if the process exits while being read,
/// [`Error::ProcRead`] when a /proc file cannot be read (often: permission).
pub fn read_facts(pid: u32, digests: &DigestCache) -> Result<ProcessFacts, Error> {
    let snapshot = Snapshot::read(pid)?;
    snapshot.facts(digests.digest_of_exe(pid)?)
}

/// Every fact of one process that attestation uses, except the digest of
/// its program, read from /proc in one go: the cheap reads (stat, status,
/// cgroup, the exe and the parent's exe links) that a cached attestation is
/// checked against, and that a fresh one is built from. All but the
/// parent's link are read through one [`ProcDir`], so they are of one
/// process: if it exits meanwhile, the reads fail rather than mix it with a
/// later process at the same pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
    /// Parent pid (0: none).
    pub ppid: u32,
    /// Real, effective, saved and file-system uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and file-system gid.
    pub gids: [u32; 4],
    /// Supplementary gids, as the kernel lists them.
    pub groups: Vec<u32>,
    /// `/proc/<pid>/cgroup`, verbatim.
    pub cgroup: String,
    /// The executable's path, as the exe link names it.
    pub exe: PathBuf,
    /// The executable's identity (device, inode, path).
    pub exe_id: crate::ids::ExeId,
    /// The executable's size, mtime and ctime (ns): with its device and
    /// inode, what the digest cache keys on, so a binary changed in place
    /// is seen.
    pub exe_file: ExeFile,
    /// The parent's executable path, when readable.
    pub parent_exe: Option<PathBuf>,
}

/// An executable's size, mtime and ctime (ns).
pub type ExeFile = (u64, i128, i128);

/// An open `/proc/<pid>` directory: it names one process, so every read
/// through it is of that process, and fails (ESRCH, or ENOENT) once it has
/// exited, even if its pid was reused since.
pub struct ProcDir {
    pid: u32,
    dir: std::os::fd::OwnedFd,
}

impl ProcDir {
    /// Opens the directory of `pid`.
    ///
    /// # Errors
    /// [`Error::ProcessGone`] if there is no such process.
    pub fn open(pid: u32) -> Result<Self, Error> {
        use rustix::fs::{Mode, OFlags};
        let dir = rustix::fs::open(
            format!("/proc/{pid}"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_error(pid, "/proc entry", e.into()))?;
        Ok(Self { pid, dir })
    }

    /// The content of the file `name` of the directory, read with a
    /// single buffer (these files are a few KiB at most).
    fn read(&self, name: &'static str) -> Result<Vec<u8>, Error> {
        use rustix::fs::{Mode, OFlags};
        let gone = |e: rustix::io::Errno| io_error(self.pid, name, e.into());
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(gone)?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(len * 2, 0);
            }
            match rustix::io::read(&fd, &mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(gone(e)),
            }
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// The program the process runs now: its identity, path, and the stat
    /// fields the digest cache keys on.
    ///
    /// # Errors
    /// [`Error::ProcessGone`] or [`Error::ProcRead`].
    pub fn exe(&self) -> Result<(crate::ids::ExeId, PathBuf, ExeFile), Error> {
        let gone = |e: rustix::io::Errno| io_error(self.pid, "exe", e.into());
        let meta =
            rustix::fs::statat(&self.dir, "exe", rustix::fs::AtFlags::empty()).map_err(gone)?;
        let link = rustix::fs::readlinkat(&self.dir, "exe", Vec::new()).map_err(gone)?;
        let exe = PathBuf::from(std::ffi::OsString::from_vec(link.into_bytes()));
        let exe_id =
            crate::ids::ExeId::new(meta.st_dev, meta.st_ino, exe.as_os_str().as_encoded_bytes());
        let file = (
            u64::try_from(meta.st_size).unwrap_or(0),
            ns(meta.st_mtime, meta.st_mtime_nsec),
            ns(meta.st_ctime, meta.st_ctime_nsec),
        );
        Ok((exe_id, exe, file))
    }

    /// Reads the snapshot of the process. Blocking; about a dozen system
    /// calls.
    ///
    /// # Errors
    /// [`Error::ProcessGone`] if the process exits while being read,
    /// [`Error::ProcRead`] when a file cannot be read.
    pub fn snapshot(&self) -> Result<Snapshot, Error> {
        let pid = self.pid;
        let (ppid, start_time) =
            parse_stat(&self.read("stat")?).ok_or_else(|| malformed(pid, "stat"))?;
        let (uids, gids, groups) =
            parse_status(&self.read("status")?).ok_or_else(|| malformed(pid, "status"))?;
        let cgroup = String::from_utf8_lossy(&self.read("cgroup")?).into_owned();
        let (exe_id, exe, exe_file) = self.exe()?;
        let parent_exe = (ppid > 0)
            .then(|| std::fs::read_link(format!("/proc/{ppid}/exe")).ok())
            .flatten();
        Ok(Snapshot {
            pid,
            start_time,
            ppid,
            uids,
            gids,
            groups,
            cgroup,
            exe,
            exe_id,
            exe_file,
            parent_exe,
        })
    }
}

impl Snapshot {
    /// Reads the snapshot of `pid` (see [`ProcDir::snapshot`]).
    ///
    /// # Errors
    /// [`Error::ProcessGone`] if there is no such process (or it exits
    /// while being read), [`Error::ProcRead`] when a file cannot be read.
    pub fn read(pid: u32) -> Result<Self, Error> {
        ProcDir::open(pid)?.snapshot()
    }

    /// The process facts, given the digest of the program.
    ///
    /// # Errors
    /// None today; kept fallible for facts that may need checking.
    pub fn facts(&self, exe_sha256: String) -> Result<ProcessFacts, Error> {
        Ok(ProcessFacts {
            pid: self.pid,
            start_time: self.start_time,
            uid: self.uids[1],
            gid: self.gids[1],
            supplementary_gids: self.groups.clone(),
            exe: self.exe.clone(),
            exe_sha256,
            exe_id: self.exe_id,
            parent_exe: self.parent_exe.clone(),
            cgroups: parse_cgroup_file(&self.cgroup),
        })
    }

    /// The first fact of `self` (read now) that differs from `cached`, the
    /// snapshot a cached attestation was built from; `None`: it still holds.
    pub fn changed_from(&self, cached: &Snapshot) -> Option<&'static str> {
        [
            (
                self.pid != cached.pid || self.start_time != cached.start_time,
                "process",
            ),
            (
                self.exe_id != cached.exe_id || self.exe != cached.exe,
                "program",
            ),
            (self.exe_file != cached.exe_file, "program file"),
            (self.uids != cached.uids, "uid"),
            (self.gids != cached.gids, "gid"),
            (self.groups != cached.groups, "supplementary groups"),
            (self.cgroup != cached.cgroup, "cgroup"),
            (self.ppid != cached.ppid, "parent"),
            (self.parent_exe != cached.parent_exe, "parent program"),
        ]
        .into_iter()
        .find_map(|(changed, what)| changed.then_some(what))
    }
}

/// Parent pid and start time from the content of `/proc/<pid>/stat`. The
/// command name (field 2) may hold spaces and parentheses, so the fields
/// are counted from its last `)`.
fn parse_stat(text: &[u8]) -> Option<(u32, u64)> {
    let close = text.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    // After the name: state (3), ppid (4), ..., starttime (22).
    let ppid = fields.nth(1)?.parse().ok()?;
    let start = fields.nth(17)?.parse().ok()?;
    Some((ppid, start))
}

/// The `Uid:`, `Gid:` and `Groups:` lines of `/proc/<pid>/status`.
fn parse_status(text: &[u8]) -> Option<([u32; 4], [u32; 4], Vec<u32>)> {
    let text = std::str::from_utf8(text).ok()?;
    let (mut uids, mut gids, mut groups) = (None, None, None);
    let four = |v: &str| -> Option<[u32; 4]> {
        let mut it = v.split_ascii_whitespace().map(|n| n.parse().ok());
        Some([it.next()??, it.next()??, it.next()??, it.next()??])
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uids = four(v);
        } else if let Some(v) = line.strip_prefix("Gid:") {
            gids = four(v);
        } else if let Some(v) = line.strip_prefix("Groups:") {
            groups = v
                .split_ascii_whitespace()
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>();
            break; // Groups comes after Uid and Gid
        }
    }
    Some((uids?, gids?, groups?))
}

/// Seconds and nanoseconds as nanoseconds (the field types vary by arch).
fn ns(secs: impl Into<i128>, nsec: impl Into<i128>) -> i128 {
    secs.into() * 1_000_000_000 + nsec.into()
}

fn malformed(pid: u32, what: &'static str) -> Error {
    Error::ProcRead {
        pid,
        what,
        source: Arc::new(io::Error::other("unexpected format")),
    }
}

pub(crate) fn io_error(pid: u32, what: &'static str, e: io::Error) -> Error {
    // ESRCH: the open /proc/<pid> directory outlived its process.
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        Error::ProcessGone { pid }
    } else {
        Error::ProcRead {
            pid,
            what,
            source: Arc::new(e),
        }
    }
}

/// Extracts the distinct cgroup paths from the content of `/proc/<pid>/cgroup`
/// (`hierarchy:controllers:path` per line, v1 or v2).
pub fn parse_cgroup_file(text: &str) -> Vec<String> {
    let mut paths: Vec<String> = text
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .filter(|path| path.starts_with('/'))
        .map(str::to_owned)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Finds a container id (64 hex digits) in a cgroup path, in the forms used by
/// docker (`/docker/<id>`, `docker-<id>.scope`), containerd
/// (`cri-containerd-<id>.scope`, `/kubepods/.../<id>`), cri-o (`crio-<id>.scope`)
/// and podman (`libpod-<id>.scope`).
pub fn container_id(cgroup_path: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ];
    cgroup_path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let name = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        let is_id = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        is_id.then(|| name.to_ascii_lowercase())
    })
}

/// The innermost systemd service a cgroup path belongs to, such as
/// `agent.service` in `/system.slice/agent.service` or in a user manager's tree.
pub fn systemd_unit(cgroup_path: &str) -> Option<String> {
    cgroup_path
        .rsplit('/')
        .find(|c| c.ends_with(".service") && c.len() > ".service".len())
        .map(str::to_owned)
}

/// Remembers executable digests so that a large binary is hashed once.
///
/// The key is (device, inode, size, mtime, ctime) of the file the process
/// runs. ctime cannot be set from user space, so a binary rewritten in place
/// and given back its old mtime still gets hashed again.
#[derive(Default)]
pub struct DigestCache {
    digests: Mutex<HashMap<FileKey, String>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// Upper bound on cached digests; the cache is cleared when it is reached.
const MAX_CACHED_DIGESTS: usize = 4096;
/// Largest executable the daemon hashes (1 GiB); a larger one is refused.
pub const MAX_HASHED_BYTES: u64 = 1 << 30;

impl DigestCache {
    /// SHA-256 of the executable that `pid` runs, read through
    /// `/proc/<pid>/exe` so it is the running inode even if the path was replaced.
    ///
    /// # Errors
    /// [`Error::ProcessGone`] or [`Error::ProcRead`] when the file cannot be read.
    pub fn digest_of_exe(&self, pid: u32) -> Result<String, Error> {
        let mut file =
            File::open(format!("/proc/{pid}/exe")).map_err(|e| io_error(pid, "exe", e))?;
        let meta = file.metadata().map_err(|e| io_error(pid, "exe", e))?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        };
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit.clone());
        }
        // A sparse file costs no disk but its whole length to hash: a client
        // could keep the daemon hashing terabytes. No real agent's
        // executable comes near the cap.
        if meta.size() > MAX_HASHED_BYTES {
            let e = io::Error::other(format!(
                "the executable is {} bytes, over the {MAX_HASHED_BYTES} the daemon will hash",
                meta.size()
            ));
            return Err(io_error(pid, "exe", e));
        }
        let digest = sha256_of(&mut file).map_err(|e| io_error(pid, "exe", e))?;
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED_DIGESTS {
            cache.clear();
        }
        cache.insert(key, digest.clone());
        Ok(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A panic while holding the lock cannot leave a half-written entry,
        // so a poisoned cache is still consistent.
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of cached digests (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn sha256_of(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1d2b9c8a7e6d5c4b3a29180716253443526170819aabbccddeeff001122334";

    #[test]
    fn container_ids_are_found_in_every_runtime_form() {
        let forms = [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods/besteffort/pod1234/{ID}"),
            format!("/machine.slice/crio-{ID}.scope"),
            format!("/user.slice/user-1000.slice/libpod-{ID}.scope/container"),
        ];
        for path in forms {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
    }

    #[test]
    fn paths_without_a_container_have_no_container_id() {
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
        assert_eq!(container_id("/docker/abc"), None);
    }

    #[test]
    fn the_innermost_service_is_the_systemd_unit() {
        assert_eq!(
            systemd_unit("/system.slice/agent.service").as_deref(),
            Some("agent.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/bot.service")
                .as_deref(),
            Some("bot.service")
        );
        assert_eq!(systemd_unit("/user.slice/session-3.scope"), None);
    }

    #[test]
    fn cgroup_files_of_v1_and_v2_give_their_paths() {
        let v2 = "0::/user.slice/user-1000.slice/session-2.scope\n";
        assert_eq!(
            parse_cgroup_file(v2),
            vec!["/user.slice/user-1000.slice/session-2.scope"]
        );
        let v1 = "12:pids:/docker/x\n11:cpu,cpuacct:/docker/x\n1:name=systemd:/docker/x\n";
        assert_eq!(parse_cgroup_file(v1), vec!["/docker/x"]);
    }

    #[test]
    fn the_facts_of_this_process_are_read_from_proc() {
        let pid = std::process::id();
        let cache = DigestCache::default();
        let facts = read_facts(pid, &cache).unwrap();
        assert_eq!(facts.pid, pid);
        assert_eq!(facts.exe, std::env::current_exe().unwrap());
        let expected = sha256_of(&mut File::open(&facts.exe).unwrap()).unwrap();
        assert_eq!(facts.exe_sha256, expected);
        assert_eq!(facts.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(start_time(pid).unwrap(), facts.start_time);
        assert_eq!(cache.len(), 1);
        read_facts(pid, &cache).unwrap();
        assert_eq!(cache.len(), 1, "the digest is computed once");
    }

    #[test]
    fn this_process_s_ancestors_start_with_its_parent() {
        let chain = ancestors(std::process::id(), 64);
        let parent = std::os::unix::process::parent_id();
        assert_eq!(chain.first().map(|a| a.0), Some(parent));
        assert_eq!(chain.first().map(|a| a.1), start_time(parent).ok());
        assert!(chain.len() <= 64);
        assert!(ancestors(std::process::id(), 0).is_empty());
        let me = groups(std::process::id()).unwrap();
        assert_eq!(me.gid, nix::unistd::getegid().as_raw());
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
    }

    #[test]
    fn stat_and_status_are_parsed_as_procfs_parses_them() {
        let me = procfs::process::Process::myself().unwrap();
        let (stat, status) = (me.stat().unwrap(), me.status().unwrap());
        let snapshot = Snapshot::read(std::process::id()).unwrap();
        assert_eq!(snapshot.start_time, stat.starttime);
        assert_eq!(i64::from(snapshot.ppid), i64::from(stat.ppid));
        assert_eq!(snapshot.uids[1], status.euid);
        assert_eq!(snapshot.gids[1], status.egid);
        assert_eq!(snapshot.groups, status.groups);
        let odd = b"42 (a) b (c)) S 7 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_stat(odd), Some((7, 99)));
    }

    #[test]
    fn a_pid_that_does_not_exist_is_gone() {
        // Above the kernel's pid_max limit (4194304), so never a live process.
        let err = read_facts(4_194_305, &DigestCache::default()).unwrap_err();
        assert!(matches!(err, Error::ProcessGone { .. }), "{err}");
    }
}
