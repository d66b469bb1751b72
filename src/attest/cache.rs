//! Attestations cached per process, and user and group names cached per id.
//!
//! Owns: reusing an [`Attestation`] for the process it was made for, and
//! when not to. Does not own: the checks against the connection (pinned
//! start time and program, uid at connect, foreign writers): `Attestor`
//! makes those on every call, cached or not.
//!
//! An entry is keyed by the process (pid and start time) and holds the
//! [`Snapshot`] it was built from. On every use a new snapshot is read (the
//! cheap reads: about a dozen system calls, no hashing, no NSS) and the
//! entry is reused only if every fact equals the cached one; one difference
//! rebuilds it. Each fact, and why comparing it is enough:
//!
//! - **pid and start time** (stat): the key; a reused pid has another start
//!   time. The snapshot is read through one open `/proc/<pid>` directory, so
//!   its facts are of one process, and the program is read through it once
//!   more at the end: that succeeds only while the process lives.
//! - **program** (the exe link's device, inode and path): an exec of another
//!   file, or of the same file by another path, changes it. An exec of the
//!   very same program is the same instance anyway (the instance id is made
//!   of these), and everything else it could change is compared below.
//! - **program file** (size, mtime, ctime of the exe): the digest cache's
//!   own key, so a binary rewritten in place is hashed again exactly as
//!   before; ctime cannot be set back from user space.
//! - **uid, gid, supplementary groups** (all four uids and gids and the
//!   groups of status): setuid(2), setgid(2) and setgroups(2) need no exec.
//! - **cgroup** (the whole file, verbatim): a process can be moved between
//!   cgroups (and so containers and systemd units) at any time.
//! - **parent pid and parent program** (stat, and the parent's exe link):
//!   reparenting changes the parent pid (the new parent was alive alongside
//!   the old one, so it has another pid), and a parent's exec changes its
//!   link.
//!
//! What it costs (release build, CPU time per attestation of a known
//! process, measured in a loop): 103 us before this cache, when every call
//! parsed stat and status through procfs, read the exe and the parent by
//! path, opened the program for its digest key, looked up NSS (parsing
//! /etc/passwd and /etc/group each time) and rebuilt the selectors; 42 us
//! now on a hit, 48 us on a miss. Nearly all of what is left is the
//! kernel making the files compared (perf: status 14%, stat 7%, cgroup 8%,
//! opens, closes and the exe links the rest); user space is under 2%.
//! Every one of those reads is a fact above, so none is skipped. Names from
//! NSS are cached per uid and gid for [`NAME_TTL`], and an attestation is
//! rebuilt at least that often, so a renamed user or group is seen within
//! it. The cache holds at most
//! [`MAX_CACHED`] processes; full, it drops expired entries and those of
//! processes that exited, and if that is not enough, everything.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};

use super::Attestation;
use super::process::Snapshot;

/// How long a user or group name, and a cached attestation, is used before
/// it is looked up or built again.
pub const NAME_TTL: Duration = Duration::from_secs(30); // 30 seconds

/// Most processes with a cached attestation.
pub const MAX_CACHED: usize = 4096;

/// Attestations of live processes, keyed by pid and start time.
#[derive(Default)]
pub(super) struct AttestCache {
    entries: Mutex<HashMap<(u32, u64), Entry>>,
}

struct Entry {
    snapshot: Snapshot,
    attestation: Attestation,
    built: Instant,
}

impl AttestCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u64), Entry>> {
        // Entries are inserted whole: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attestation cached for the process `now` was read from, if every
    /// fact of `now` equals the one it was built from and it is fresh.
    pub(super) fn get(&self, now: &Snapshot) -> Option<Attestation> {
        let entries = self.lock();
        let entry = entries.get(&(now.pid, now.start_time))?;
        if entry.built.elapsed() >= NAME_TTL {
            return None;
        }
        match now.changed_from(&entry.snapshot) {
            None => Some(entry.attestation.clone()),
            Some(what) => {
                tracing::debug!(pid = now.pid, changed = what, "attesting again");
                None
            }
        }
    }

    /// Caches `attestation`, built from `snapshot`.
    pub(super) fn insert(&self, snapshot: Snapshot, attestation: Attestation) {
        let mut entries = self.lock();
        if entries.len() >= MAX_CACHED {
            entries.retain(|(pid, start), e| {
                e.built.elapsed() < NAME_TTL
                    && super::process::start_time(*pid).is_ok_and(|now| now == *start)
            });
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
        }
        let key = (snapshot.pid, snapshot.start_time);
        entries.insert(
            key,
            Entry {
                snapshot,
                attestation,
                built: Instant::now(),
            },
        );
    }

    /// Forgets every entry of `pid` (its process exited or was replaced).
    pub(super) fn forget(&self, pid: u32) {
        self.lock().retain(|(p, _), _| *p != pid);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// User and group names from NSS, by id, for [`NAME_TTL`]: without it each
/// new process costs a parse of /etc/passwd and /etc/group (or a round trip
/// to another NSS service).
#[derive(Default)]
pub(super) struct NameCache {
    users: Mutex<HashMap<u32, (Option<String>, Instant)>>,
    groups: Mutex<HashMap<u32, (Option<String>, Instant)>>,
}

/// Most names of each kind kept; the map is emptied when it is reached.
const MAX_NAMES: usize = 1024;

impl NameCache {
    /// The name of user `uid`, if it has one.
    pub(super) fn user(&self, uid: u32) -> Option<String> {
        cached(&self.users, uid, |uid| {
            User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }

    /// The name of group `gid`, if it has one.
    pub(super) fn group(&self, gid: u32) -> Option<String> {
        cached(&self.groups, gid, |gid| {
            Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name)
        })
    }
}

fn cached(
    map: &Mutex<HashMap<u32, (Option<String>, Instant)>>,
    id: u32,
    look_up: impl FnOnce(u32) -> Option<String>,
) -> Option<String> {
    // Names only: a poisoned map still holds usable ones.
    let lock = || map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((name, at)) = lock().get(&id)
        && at.elapsed() < NAME_TTL
    {
        return name.clone();
    }
    // Looked up without the lock: NSS may be slow.
    let name = look_up(id);
    let mut names = lock();
    if names.len() >= MAX_NAMES {
        names.clear();
    }
    names.insert(id, (name.clone(), Instant::now()));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Snapshot {
        Snapshot::read(std::process::id()).unwrap()
    }

    #[test]
    fn a_snapshot_read_twice_has_not_changed() {
        assert_eq!(me().changed_from(&me()), None);
    }

    #[test]
    fn each_fact_that_can_change_without_an_exec_is_compared() {
        let cached = me();
        type Change = (&'static str, fn(&mut Snapshot));
        let changes: [Change; 9] = [
            ("process", |s| s.start_time += 1),
            ("program", |s| s.exe_id.ino += 1),
            ("program", |s| s.exe.push("x")),
            ("program file", |s| s.exe_file.2 += 1),
            ("uid", |s| s.uids[1] += 1),
            ("gid", |s| s.gids[3] += 1),
            ("supplementary groups", |s| s.groups.push(4242)),
            ("cgroup", |s| s.cgroup.push_str("1:name=x:/moved\n")),
            ("parent", |s| s.ppid += 1),
        ];
        for (what, change) in changes {
            let mut now = cached.clone();
            change(&mut now);
            assert_eq!(now.changed_from(&cached), Some(what));
        }
        let mut reparented = cached.clone();
        reparented.parent_exe = Some("/usr/bin/other".into());
        assert_eq!(reparented.changed_from(&cached), Some("parent program"));
    }

    #[test]
    fn names_are_looked_up_once_within_their_expiry() {
        let names = NameCache::default();
        let mut lookups = 0;
        for _ in 0..3 {
            cached(&names.users, 4242, |_| {
                lookups += 1;
                Some("agent".into())
            });
        }
        assert_eq!(lookups, 1);
        assert_eq!(names.user(0).as_deref(), Some("root"));
    }
}
