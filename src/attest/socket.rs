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
//! 3. **Who can read the answer** ([`check_sole_holder`]; the walk and its
//!    batching are in `attest::holders`): before a private key is written,
//!    the client end of the connection (found with sock_diag) must be held
//!    by the attested process and by no other process or thread. This
//!    covers the fork-then-exec race where the exec happens before the
//!    daemon accepts the connection.
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

pub use super::holders::check_sole_holder;
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
