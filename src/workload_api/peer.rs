//! Accepted connections, stamped with their peer credentials and accept time.
//!
//! The accept time lets attestation refuse a process that started after the
//! connection was made: it cannot be the process that connected, so its pid
//! was reused. tonic copies [`PeerInfo`] into every request's extensions.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::authority::AuthorityFix;
use crate::attest::{self, PeerCred};

/// What the kernel told us about a connection when it was accepted.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// SO_PEERCRED and the peer address, as tonic reads them.
    pub uds: UdsConnectInfo,
    /// When the connection was accepted, in clock ticks since boot.
    pub accepted_at_ticks: u64,
    /// Start time of the connecting process, pinned through its pidfd.
    pub start_time: Option<u64>,
}

impl PeerInfo {
    /// The credentials attestation works from, if the kernel gave any.
    pub fn peer_cred(&self) -> Option<PeerCred> {
        let cred = self.uds.peer_cred?;
        Some(PeerCred {
            pid: u32::try_from(cred.pid()?).ok()?,
            uid: cred.uid(),
            gid: cred.gid(),
            accepted_at_ticks: Some(self.accepted_at_ticks),
            start_time: self.start_time,
        })
    }
}

/// A `UnixStream` with its accept time.
pub struct AcceptedStream {
    inner: UnixStream,
    accepted_at_ticks: u64,
    start_time: Option<u64>,
}

impl Connected for AcceptedStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            uds: self.inner.connect_info(),
            accepted_at_ticks: self.accepted_at_ticks,
            start_time: self.start_time,
        }
    }
}

impl AsyncRead for AcceptedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AcceptedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The start time of the process at the other end of `stream`, pinned
/// through its pidfd: the pidfd names the connecting process itself, so if
/// it is still alive after its pid's start time was read, that start time
/// is its own. `None` when the kernel has no SO_PEERPIDFD (before 6.5) or
/// the process has already exited.
fn peer_start_time(stream: &UnixStream) -> Option<u64> {
    let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok()?;
    let pid = pidfd_pid(&pidfd)?;
    let start = attest::process::start_time(pid).ok()?;
    (pidfd_pid(&pidfd)? == pid).then_some(start)
}

/// The pid a pidfd refers to, from /proc/self/fdinfo; `None` once that
/// process has exited (the kernel then reports -1).
fn pidfd_pid(pidfd: &std::os::fd::OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|pid| u32::try_from(pid).ok())
}

/// How long the accept loop pauses after an accept error (e.g. out of file
/// descriptors) before trying again, instead of spinning or giving up.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The stream of accepted connections tonic serves. Accept errors are
/// logged and retried, never passed on: tonic would stop serving on them.
pub struct Incoming {
    listener: UnixListener,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Serves connections accepted on `listener`.
    pub fn new(listener: UnixListener) -> Self {
        Self {
            listener,
            pause: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<AuthorityFix<AcceptedStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((inner, _))) => {
                    let accepted_at_ticks = attest::now_in_ticks();
                    let start_time = peer_start_time(&inner);
                    let stream = AcceptedStream {
                        inner,
                        accepted_at_ticks,
                        start_time,
                    };
                    return Poll::Ready(Some(Ok(AuthorityFix::new(stream))));
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_connecting_process_is_pinned_by_its_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let ours = attest::process::start_time(std::process::id()).unwrap();
        match peer_start_time(&accepted) {
            Some(start) => assert_eq!(start, ours),
            // Kernels before 6.5 have no SO_PEERPIDFD; the fallback applies.
            None => eprintln!("no SO_PEERPIDFD on this kernel"),
        }
    }
}
