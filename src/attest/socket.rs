//! The kernel's facts about one connection to the workload socket: which
//! program opened it, which process wrote each of its bytes, and which
//! processes hold its client end.
//!
//! Why this exists: SO_PEERCRED names the process that called connect(2),
//! but a connected socket can outlive that program or change hands. A
//! process may connect, fork, and exec a trusted binary (which keeps the pid
//! and start time), leaving the request to be written, or the response read,
//! by a process that was never attested; it may pass the socket to another
//! process with SCM_RIGHTS. SPIRE's and Teleport's Unix attestors read /proc
//! of the SO_PEERCRED pid and have that hole. Sigil closes it with three
//! checks, each cheap and each from the kernel's facts alone:
//!
//! 1. **Who wrote the bytes** ([`read_with_writer`]): the listening socket
//!    has SO_PASSCRED, which accepted sockets inherit, so the kernel tags
//!    every chunk of the client's bytes with the writer's pid and never
//!    merges chunks of two writers into one read. Bytes written by any
//!    process but the one that connected mark the connection, and every
//!    request on it is refused. (SCM_PIDFD would name the writer more
//!    exactly, but the pid is compared with a process pinned by its pidfd,
//!    so a reused pid is already refused by the start-time check.)
//! 2. **Which program connected** ([`ExeId`]): the executable's inode is
//!    read when the connection is accepted (with the start time, under the
//!    peer's pidfd). A process that exec's another program after that is
//!    refused: the connection belongs to the program that opened it.
//! 3. **Who can read the answer** ([`check_sole_holder`]): before a private
//!    key is written, the client end of the connection (found with
//!    sock_diag) must be held by the attested process and by no other
//!    process or thread. This covers the fork-then-exec race where the exec
//!    happens before the daemon accepts the connection.
//!
//! What remains (stated in the README): a file descriptor in flight in an
//! SCM_RIGHTS message that nobody has received yet is in no process's fd
//! table, so it escapes check 3; together with an exec that wins the race
//! against accept(2), that could still leak a key to a patient attacker.
//! And a process that may ptrace another (same uid, no Yama) can make it do
//! anything, including connect: path and digest selectors do not defend
//! against their own uid.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use nix::sys::socket::{self as sock, ControlMessageOwned, MsgFlags, UnixCredentials};

use super::Error;

pub use crate::ids::ExeId;

/// The executable `pid` runs now.
///
/// # Errors
/// [`Error::ProcessGone`] or [`Error::ProcRead`].
pub fn exe_id(pid: u32) -> Result<ExeId, Error> {
    let link = format!("/proc/{pid}/exe");
    let gone = |e| super::process::io_error(pid, "exe", e);
    let meta = std::fs::metadata(&link).map_err(gone)?;
    let path = std::fs::read_link(&link).map_err(gone)?;
    Ok(ExeId::new(
        meta.dev(),
        meta.ino(),
        path.as_os_str().as_encoded_bytes(),
    ))
}

/// The connecting process as the kernel knew it when the connection was
/// accepted. A connection without a pin never receives a private key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedPeer {
    /// Its start time: a later process at the same pid has another.
    pub start_time: u64,
    /// The program it ran.
    pub exe: ExeId,
    /// Whether it is in the daemon's own pid namespace. Only then is the
    /// writer pid SO_PASSCRED reports the kernel's word: a process with
    /// CAP_SYS_ADMIN over its own pid namespace (anyone, through a user
    /// namespace) may put another pid in SCM_CREDENTIALS.
    pub same_pid_ns: bool,
}

/// Pins the process at the other end of `socket`. With SO_PEERPIDFD (Linux
/// 6.5+) the pidfd names the connecting process itself, so if it is still
/// alive after its start time and program were read, they are its own; on
/// older kernels the SO_PEERCRED pid is read between two reads of its start
/// time. `None` when the process has exited or its program cannot be read
/// (e.g. a binary on another user's FUSE mount): such a connection gets no
/// keys.
pub fn pin_peer(socket: &impl AsFd) -> Option<PinnedPeer> {
    let pidfd = sock::getsockopt(socket, sock::sockopt::PeerPidfd).ok();
    let pid = match &pidfd {
        Some(pidfd) => pidfd_pid(pidfd)?,
        None => {
            let cred = sock::getsockopt(socket, sock::sockopt::PeerCredentials).ok()?;
            u32::try_from(cred.pid()).ok()?
        }
    };
    let start_time = super::process::start_time(pid).ok()?;
    let exe = exe_id(pid).ok()?;
    let same_pid_ns = same_pid_namespace(pid)?;
    let still = match &pidfd {
        Some(pidfd) => pidfd_pid(pidfd)? == pid,
        None => super::process::start_time(pid).ok()? == start_time,
    };
    still.then_some(PinnedPeer {
        start_time,
        exe,
        same_pid_ns,
    })
}

/// SO_PEERCRED of an accepted connection, and when it was accepted: the
/// first facts read, before the connection is admitted (they are all a
/// per-uid cap needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketCred {
    /// The pid that called connect(2); `None` when the kernel reports none
    /// (0: the peer is in a pid namespace the daemon cannot see into).
    pub pid: Option<u32>,
    /// Its effective uid at connect time.
    pub uid: u32,
    /// Its effective gid at connect time.
    pub gid: u32,
    /// When the connection was accepted, in clock ticks since boot (read
    /// before the credentials, so never after the connecting process's
    /// real accept).
    pub accepted_at_ticks: u64,
}

impl SocketCred {
    /// Reads the accept time, then SO_PEERCRED. `None` when the socket has
    /// no peer credentials (not a connected Unix socket).
    pub fn read(socket: &impl AsFd) -> Option<Self> {
        let accepted_at_ticks = super::now_in_ticks();
        let cred = sock::getsockopt(socket, sock::sockopt::PeerCredentials).ok()?;
        Some(Self {
            pid: u32::try_from(cred.pid()).ok().filter(|pid| *pid != 0),
            uid: cred.uid(),
            gid: cred.gid(),
            accepted_at_ticks,
        })
    }
}

/// Everything the kernel says about an accepted connection, read once when
/// it is admitted: the credentials, the pinned connecting process, the
/// client end's inode and how much the client had written by the pin.
/// [`super::PeerCred::from_accepted`] turns it into what attestation reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// SO_PEERCRED and the accept time.
    pub cred: SocketCred,
    /// The connecting process, pinned through its pidfd; `None`: the
    /// connection never gets a private key.
    pub pinned: Option<PinnedPeer>,
    /// Inode of the client's end of the socket (sock_diag), for the check
    /// that nobody else holds it before a key is written.
    pub client_inode: Option<u64>,
    /// How many bytes the client had written before the connecting process
    /// was pinned (`u64::MAX`: unknown, count all of them).
    pub queued_at_pin: u64,
}

impl Accepted {
    /// Pins the peer of `socket`, then reads what was queued by then and
    /// the client end's inode. Blocking (a few /proc reads and one netlink
    /// round trip); failures leave the fact unknown, which costs the
    /// connection its keys, never the daemon its safety.
    pub fn read(socket: &impl AsFd, cred: SocketCred) -> Self {
        let pinned = pin_peer(socket);
        // After the pin: what is queued now includes all that was written
        // before it.
        let queued_at_pin = rustix::io::ioctl_fionread(socket).unwrap_or(u64::MAX);
        let client_inode = peer_inode(socket).ok();
        Self {
            cred,
            pinned,
            client_inode,
            queued_at_pin,
        }
    }
}

/// Checks, before each message carrying private keys, that the connection
/// was pinned to a program and that `pid` still runs it (an exec since the
/// last message ends the connection's right to keys).
///
/// # Errors
/// [`Error::NotPinned`] or [`Error::ExecutedAfterConnect`].
pub fn check_program(pid: u32, pinned: Option<PinnedPeer>) -> Result<(), Error> {
    let pinned = pinned.ok_or(Error::NotPinned { pid })?;
    if exe_id(pid).ok() != Some(pinned.exe) {
        return Err(Error::ExecutedAfterConnect { pid });
    }
    Ok(())
}

/// Whether a pinned connection needs the sole-holder scan before its first
/// key. It does not when no request had been written before the pin
/// (`early_request` false: bytes queued then held no HTTP/2 HEADERS frame)
/// and the writer pids are the kernel's word (same pid namespace): every
/// request then came from the pinned program, which is still the one
/// running, so no other program asked for the key or prepared a reader for
/// it. (A preface written before an exec asks for nothing.)
pub fn needs_holder_scan(pinned: &PinnedPeer, early_request: bool) -> bool {
    early_request || !pinned.same_pid_ns
}

/// Whether `pid` is in the daemon's pid namespace.
fn same_pid_namespace(pid: u32) -> Option<bool> {
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    Some(ours.dev() == theirs.dev() && ours.ino() == theirs.ino())
}

/// The pid a pidfd refers to, from /proc/self/fdinfo; `None` once that
/// process has exited (the kernel then reports -1).
fn pidfd_pid(pidfd: &std::os::fd::OwnedFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|pid| u32::try_from(pid).ok())
}

/// Turns on SO_PASSCRED, so that every read from this socket (and from
/// every socket accepted on it, which inherit the flag) says who wrote the
/// bytes.
///
/// # Errors
/// The setsockopt(2) error.
pub fn pass_credentials(socket: &impl AsFd) -> io::Result<()> {
    sock::setsockopt(socket, sock::sockopt::PassCred, &true).map_err(io::Error::from)
}

/// Reads from a connected socket whose listener has SO_PASSCRED, and returns
/// how many bytes were read and the pid of the process that wrote them
/// (`None` when the kernel attached no credentials, which must be treated as
/// an unknown writer). The kernel never returns bytes of two writers in one
/// read. File descriptors a client tries to pass are never installed: the
/// control buffer only has room for the credentials, so the kernel drops
/// them (and any that did arrive are closed here).
///
/// # Errors
/// The recvmsg(2) error, e.g. `WouldBlock`.
pub fn read_with_writer(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<u32>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(UnixCredentials);
    let msg = sock::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut writer = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        match cmsg {
            ControlMessageOwned::ScmCredentials(cred) => writer = u32::try_from(cred.pid()).ok(),
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    let _ = nix::unistd::close(fd);
                }
            }
            _ => {}
        }
    }
    Ok((msg.bytes, writer.filter(|pid| *pid != 0)))
}

/// The inode of the socket at the other end of `socket` (the client's end of
/// an accepted connection), from the kernel's sock_diag interface.
///
/// # Errors
/// When sock_diag is unavailable or the socket has no peer.
pub fn peer_inode(socket: &impl AsFd) -> io::Result<u64> {
    let own = rustix::fs::fstat(socket.as_fd()).map_err(io::Error::from)?;
    let own_ino = u32::try_from(own.st_ino)
        .map_err(|_| io::Error::other("socket inode out of sock_diag's 32-bit range"))?;
    let diag = sock::socket(
        sock::AddressFamily::Netlink,
        sock::SockType::Datagram,
        sock::SockFlag::SOCK_CLOEXEC,
        sock::SockProtocol::NetlinkSockDiag,
    )
    .map_err(io::Error::from)?;
    let request = diag::request(own_ino);
    sock::sendto(
        diag.as_raw_fd(),
        &request,
        &sock::NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut reply = [0u8; 1024];
    let n = sock::recv(diag.as_raw_fd(), &mut reply, MsgFlags::empty()).map_err(io::Error::from)?;
    diag::peer_of(&reply[..n]).map(u64::from)
}

/// Checks that the client end `client_inode` of `pid`'s connection is held
/// by `pid` and by no other process or thread. A thread may have an fd table
/// of its own (unshare(CLONE_FILES)), so every thread's table is looked at,
/// but each table once: threads that share their process's table (kcmp(2)
/// says so) are skipped.
///
/// # Errors
/// [`Error::NotHeldByCaller`] when `pid` does not hold it,
/// [`Error::SharedConnection`] naming another holder.
pub fn check_sole_holder(pid: u32, client_inode: u64) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let target = format!("socket:[{client_inode}]");
    if !holds(pid, &target) {
        return Err(Error::NotHeldByCaller { pid });
    }
    let procs = std::fs::read_dir("/proc").map_err(|e| Error::ProcRead {
        pid,
        what: "list of processes",
        source: std::sync::Arc::new(e),
    })?;
    for entry in procs.flatten() {
        // Fail closed: other users can make the scan long (many threads
        // with private fd tables), and a scan that does not finish proves
        // nothing.
        if started.elapsed() > MAX_SCAN {
            return Err(Error::HolderScanTooLong { pid });
        }
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if other != pid && holds(other, &target) {
            return Err(Error::SharedConnection { pid, holder: other });
        }
    }
    Ok(())
}

/// Longest a sole-holder scan may take before the key is refused.
const MAX_SCAN: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether any fd table of process `pid` (its own, or a thread's private
/// one) has an fd whose link is `target`. Unreadable directories (a process
/// that exited, or one a non-root daemon may not inspect) count as not
/// holding it.
fn holds(pid: u32, target: &str) -> bool {
    if table_holds(&format!("/proc/{pid}/fd"), target) {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return false;
        };
        tid != pid
            && crate::sys::same_fd_table(pid, tid) != Some(true)
            && table_holds(&format!("/proc/{pid}/task/{tid}/fd"), target)
    })
}

/// Whether the fd directory `dir` has an fd whose link is `target`. The
/// links are read relative to the open directory into one reused buffer:
/// this is the daemon's most repeated /proc read.
fn table_holds(dir: &str, target: &str) -> bool {
    use rustix::fs::{Dir, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(dir_fd) = rustix::fs::open(dir, flags, Mode::empty()) else {
        return false;
    };
    let Ok(entries) = Dir::read_from(&dir_fd) else {
        return false;
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            return false;
        }
        let Ok((link, _)) = rustix::fs::readlinkat_raw(&dir_fd, name, &mut buf) else {
            return false;
        };
        link == target.as_bytes() || (link == IO_URING.as_bytes() && ring_holds(dir, name, target))
    })
}

/// What /proc shows as the link of an io_uring instance's fd.
const IO_URING: &str = "anon_inode:[io_uring]";

/// Whether the io_uring instance at fd `name` of fd directory `dir` holds
/// `target` as a registered ("fixed") file: such a file is in no fd table,
/// yet the ring's owner can read from it. Its fdinfo lists them.
fn ring_holds(dir: &str, name: &std::ffi::CStr, target: &str) -> bool {
    let Some(base) = dir.strip_suffix("/fd") else {
        return false;
    };
    let fdinfo = format!("{base}/fdinfo/{}", name.to_string_lossy());
    std::fs::read_to_string(fdinfo).is_ok_and(|info| {
        info.lines().any(|line| {
            line.split_once(": ")
                .is_some_and(|(_, file)| file == target)
        })
    })
}

/// The sock_diag wire format for one AF_UNIX lookup by inode
/// (linux/sock_diag.h, linux/unix_diag.h).
mod diag {
    use std::io;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_HDR_LEN: usize = 16;
    const AF_UNIX: u8 = 1;
    const UDIAG_SHOW_PEER: u32 = 0x4;
    const UNIX_DIAG_PEER: u16 = 2;
    /// `struct unix_diag_msg`: family, type, state, pad, ino, cookie[2].
    const DIAG_MSG_LEN: usize = 16;

    /// A request for the socket with inode `ino`, asking for its peer.
    pub(super) fn request(ino: u32) -> Vec<u8> {
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&[AF_UNIX, 0, 0, 0]); // family, protocol, pad
        body.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
        body.extend_from_slice(&ino.to_ne_bytes());
        body.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
        body.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
        body.extend_from_slice(&u32::MAX.to_ne_bytes());
        let len = u32::try_from(NLMSG_HDR_LEN + body.len()).unwrap_or(u32::MAX);
        let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + body.len());
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        msg.extend_from_slice(&body);
        msg
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// The peer inode in a reply to [`request`].
    pub(super) fn peer_of(reply: &[u8]) -> io::Result<u32> {
        let bad = |what: &str| io::Error::other(format!("sock_diag reply: {what}"));
        let kind = u16_at(reply, 4).ok_or_else(|| bad("too short"))?;
        if kind == NLMSG_ERROR {
            let errno = u32_at(reply, NLMSG_HDR_LEN).map_or(0, |e| e as i32);
            return Err(io::Error::from_raw_os_error(-errno));
        }
        if kind != SOCK_DIAG_BY_FAMILY {
            return Err(bad("unexpected message type"));
        }
        let len = u32_at(reply, 0).ok_or_else(|| bad("too short"))? as usize;
        let msg = reply.get(..len).ok_or_else(|| bad("truncated"))?;
        let mut at = NLMSG_HDR_LEN + DIAG_MSG_LEN;
        while let (Some(rta_len), Some(rta_type)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
            let rta_len = usize::from(rta_len);
            if rta_len < 4 {
                break;
            }
            if rta_type == UNIX_DIAG_PEER {
                return u32_at(msg, at + 4).ok_or_else(|| bad("short peer attribute"));
            }
            at += (rta_len + 3) & !3;
        }
        Err(bad("the socket has no peer"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn sock_diag_names_the_other_end_of_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let b_ino = std::fs::metadata(format!("/proc/self/fd/{}", b.as_raw_fd()))
            .unwrap()
            .ino();
        assert_eq!(peer_inode(&a).unwrap(), b_ino);
    }

    #[test]
    fn the_holder_of_both_ends_is_found_and_a_missing_end_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let me = std::process::id();
        let b_ino = peer_inode(&a).unwrap();
        check_sole_holder(me, b_ino).unwrap();
        drop(b);
        // Nobody holds the client end any more (the socket is gone).
        assert!(matches!(
            check_sole_holder(me, b_ino),
            Err(Error::NotHeldByCaller { .. })
        ));
    }

    #[test]
    fn a_child_holding_the_client_end_is_named() {
        let (a, b) = UnixStream::pair().unwrap();
        let b_ino = peer_inode(&a).unwrap();
        // A child that inherits `b` (as a forked process would).
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                b.try_clone().unwrap(),
            )))
            .spawn()
            .unwrap();
        let child_pid = child.id();
        let verdict = check_sole_holder(std::process::id(), b_ino);
        child.kill().unwrap();
        child.wait().unwrap();
        match verdict {
            Err(Error::SharedConnection { holder, .. }) => assert_eq!(holder, child_pid),
            other => panic!("expected the child to be named, got {other:?}"),
        }
    }

    /// Runs a python `script` with `socket` as its stdin, and returns it and
    /// the first line it prints (once it has hidden its copy).
    fn python_holding(socket: UnixStream, script: &str) -> (std::process::Child, String) {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                socket,
            )))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        (child, line)
    }

    #[test]
    fn a_copy_hidden_in_a_threads_private_fd_table_is_found() {
        let (a, b) = UnixStream::pair().unwrap();
        let b_ino = peer_inode(&a).unwrap();
        // The child gets `b` as stdin; a thread of it unshars its fd table
        // (so it keeps a copy) and the main thread then closes its own.
        let script = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
ready = threading.Event()
def hide():
    assert libc.unshare(0x400) == 0  # CLONE_FILES
    ready.set()
    time.sleep(30)
threading.Thread(target=hide, daemon=True).start()
ready.wait()
os.close(0)
print("hidden", flush=True)
time.sleep(30)
"#;
        let (mut child, line) = python_holding(b, script);
        assert_eq!(line.trim(), "hidden");
        assert!(
            !table_holds(
                &format!("/proc/{}/fd", child.id()),
                &format!("socket:[{b_ino}]")
            ),
            "the process's own table no longer has it"
        );
        let found = holds(child.id(), &format!("socket:[{b_ino}]"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "the copy in the thread's own table is found");
    }

    #[test]
    fn a_copy_registered_in_an_io_uring_and_closed_is_found() {
        let (a, b) = UnixStream::pair().unwrap();
        let b_ino = peer_inode(&a).unwrap();
        // The child registers its stdin (`b`) as an io_uring fixed file and
        // closes the fd: the ring alone keeps the socket.
        let script = r#"
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
ring = libc.syscall(425, 4, params)  # io_uring_setup
if ring < 0:
    print("no-io-uring", flush=True); time.sleep(30)
files = (ctypes.c_int * 1)(0)
assert libc.syscall(427, ring, 2, files, 1) == 0  # IORING_REGISTER_FILES
os.close(0)
print("registered", flush=True)
time.sleep(30)
"#;
        let (mut child, line) = python_holding(b, script);
        let found = holds(child.id(), &format!("socket:[{b_ino}]"));
        child.kill().unwrap();
        child.wait().unwrap();
        match line.trim() {
            "registered" => assert!(found, "the ring's fixed file is found"),
            other => eprintln!("skipped: {other} (io_uring unavailable here)"),
        }
    }

    #[test]
    fn each_read_names_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        pass_credentials(&listener).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut client, b"hello").unwrap();
        let mut buf = [0u8; 16];
        let (n, writer) = read_with_writer(server.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(writer, Some(std::process::id()));
    }

    #[test]
    fn the_connecting_process_is_pinned_by_its_start_time_and_program() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = std::process::id();
        match pin_peer(&a) {
            Some(pinned) => {
                assert_eq!(
                    pinned.start_time,
                    super::super::process::start_time(me).unwrap()
                );
                assert_eq!(pinned.exe, exe_id(me).unwrap());
                assert!(pinned.same_pid_ns);
            }
            None => panic!("this process can always be pinned"),
        }
    }

    #[test]
    fn an_exec_changes_the_exe_id() {
        let me = exe_id(std::process::id()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let sleep = exe_id(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_ne!(me, sleep);
    }
}
