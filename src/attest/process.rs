//! Facts about a process, read from /proc.
//!
//! Everything here comes from the kernel: the exe link, its content, status,
//! stat and cgroup files. Nothing a client sends is consulted. Reading another
//! user's /proc/<pid>/exe needs privilege, so a daemon that runs as a normal
//! user can attest only that user's processes, and says so.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
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
    let stat = proc(pid)?.stat().map_err(|e| proc_error(pid, "stat", e))?;
    Ok(stat.starttime)
}

/// Collects every fact about `pid` that selectors are made from.
///
/// # Errors
/// [`Error::ProcessGone`] if the process exits while being read,
/// [`Error::ProcRead`] when a /proc file cannot be read (often: permission).
pub fn read_facts(pid: u32, digests: &DigestCache) -> Result<ProcessFacts, Error> {
    let process = proc(pid)?;
    let stat = process.stat().map_err(|e| proc_error(pid, "stat", e))?;
    let status = process.status().map_err(|e| proc_error(pid, "status", e))?;
    let exe = process.exe().map_err(|e| proc_error(pid, "exe", e))?;
    let exe_id = super::socket::exe_id(pid)?;
    let exe_sha256 = digests.digest_of_exe(pid)?;
    let parent_exe = u32::try_from(stat.ppid)
        .ok()
        .filter(|ppid| *ppid > 0)
        .and_then(|ppid| procfs::process::Process::new(ppid as i32).ok()?.exe().ok());
    let cgroups = read_cgroups(pid)?;
    Ok(ProcessFacts {
        pid,
        start_time: stat.starttime,
        uid: status.euid,
        gid: status.egid,
        supplementary_gids: status.groups,
        exe,
        exe_sha256,
        exe_id,
        parent_exe,
        cgroups,
    })
}

fn proc(pid: u32) -> Result<procfs::process::Process, Error> {
    let raw = i32::try_from(pid).map_err(|_| Error::ProcessGone { pid })?;
    procfs::process::Process::new(raw).map_err(|e| proc_error(pid, "/proc entry", e))
}

fn proc_error(pid: u32, what: &'static str, e: procfs::ProcError) -> Error {
    match e {
        procfs::ProcError::NotFound(_) => Error::ProcessGone { pid },
        other => Error::ProcRead {
            pid,
            what,
            source: Arc::new(io::Error::other(other.to_string())),
        },
    }
}

pub(crate) fn io_error(pid: u32, what: &'static str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::ProcessGone { pid }
    } else {
        Error::ProcRead {
            pid,
            what,
            source: Arc::new(e),
        }
    }
}

fn read_cgroups(pid: u32) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| io_error(pid, "cgroup", e))?;
    Ok(parse_cgroup_file(&text))
}

/// Extracts the distinct cgroup paths from the content of /proc/<pid>/cgroup
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

impl DigestCache {
    /// SHA-256 of the executable that `pid` runs, read through
    /// /proc/<pid>/exe so it is the running inode even if the path was replaced.
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
    fn a_pid_that_does_not_exist_is_gone() {
        // Above the kernel's pid_max limit (4194304), so never a live process.
        let err = read_facts(4_194_305, &DigestCache::default()).unwrap_err();
        assert!(matches!(err, Error::ProcessGone { .. }), "{err}");
    }
}
