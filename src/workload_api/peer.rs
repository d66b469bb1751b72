//! Accepted connections: who is at the other end, who writes their bytes,
//! and how long they may stay.
//!
//! Owns the per-connection state that the I/O adapter and the handlers
//! share ([`Connection`], reached from a request through [`PeerInfo`]), the
//! per-uid connection cap applied at accept, and the watchdog that closes a
//! connection which never gets a request through (an idle client, a
//! slowloris) or stays open with nothing in flight, and [`caller`], the one
//! place a request's [`PeerCred`] is taken from. The kernel facts themselves
//! (SO_PEERCRED, pidfd pinning, SO_PASSCRED reads, sock_diag) are read by
//! `attest::socket` ([`Accepted`]); the rules they feed are in `attest`.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::authority::AuthorityFix;
use crate::attest::{self, PeerCred, socket::Accepted};
use crate::config::ClientLimits;
use crate::identity;

/// What a request knows about its connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The connection's shared state.
    pub conn: Arc<Connection>,
}

/// The caller of a request on the workload socket: the credentials
/// attestation works from, and its connection.
///
/// # Errors
/// [`attest::Error::NoPeerCredentials`] when the request did not come over
/// an accepted Unix connection whose peer the kernel named.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<(PeerCred, Arc<Connection>), attest::Error> {
    let conn = &req
        .extensions()
        .get::<PeerInfo>()
        .ok_or(attest::Error::NoPeerCredentials)?
        .conn;
    let peer = conn.peer_cred().ok_or(attest::Error::NoPeerCredentials)?;
    Ok((peer, conn.clone()))
}

/// One accepted connection, as the kernel described it at accept time,
/// plus what has been seen on it since.
#[derive(Debug)]
pub struct Connection {
    /// The kernel's facts, read when the connection was admitted.
    pub accepted: Accepted,
    /// Whether a request (an HTTP/2 HEADERS frame) started within the bytes
    /// queued when the peer was pinned (`accepted.queued_at_pin`). If not, every request on the connection was written by the
    /// pinned program itself, and the sole-holder scan is not needed (see
    /// `attest::socket`).
    pub early_request: AtomicBool,
    /// The verdict of the check that the connecting process alone holds the
    /// client end, made once before the connection's first private key.
    pub sole_holder: tokio::sync::OnceCell<Result<(), identity::Error>>,
    /// The first process other than the connecting one seen writing bytes
    /// (0: none).
    foreign_writer: AtomicU32,
    activity: Activity,
    slot: UidSlot,
}

impl Connection {
    /// The credentials attestation works from, if the kernel gave any.
    pub fn peer_cred(&self) -> Option<PeerCred> {
        let writer = match self.foreign_writer.load(Ordering::Acquire) {
            0 => None,
            pid => Some(pid),
        };
        PeerCred::from_accepted(&self.accepted, writer)
    }

    /// Marks a request (or a response stream) in flight until the guard is
    /// dropped; a connection with none in flight is idle.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.activity.served.store(true, Ordering::Release);
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard { conn: self.clone() }
    }

    fn peer_pid(&self) -> Option<u32> {
        self.accepted.cred.pid
    }

    /// Records who wrote `n` bytes just read. The first foreign writer
    /// sticks: every later request on the connection is refused.
    fn note_writer(&self, writer: Option<u32>) {
        if writer.is_some() && writer == self.peer_pid() {
            return;
        }
        // An unknown writer (no credentials) is refused like a foreign one.
        let writer = writer.unwrap_or(u32::MAX);
        if self
            .foreign_writer
            .compare_exchange(0, writer, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                pid = self.peer_pid(),
                writer,
                "bytes on a connection written by a process other than the one that connected; refusing its requests"
            );
        }
    }
}

/// Keeps its connection busy while alive (see [`Connection::begin_request`]).
#[derive(Debug)]
pub struct RequestGuard {
    conn: Arc<Connection>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.conn.activity;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *activity.idle_since() = Instant::now();
        }
    }
}

/// Requests in flight on a connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    served: AtomicBool,
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// What the watchdog decides.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Look again at this time.
    CheckAt(Instant),
    /// Close the connection, for this reason.
    Close(&'static str),
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            accepted: now,
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
        }
    }

    fn idle_since(&self) -> std::sync::MutexGuard<'_, Instant> {
        // Holds a plain Instant: a poisoned lock still holds a valid one.
        self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The one rule for how long a connection may stay: its first request
    /// must reach a handler within the handshake timeout; after that it may
    /// stay while a request or stream is in flight, and for the idle timeout
    /// after the last one ended.
    fn verdict(&self, now: Instant, limits: &ClientLimits) -> Verdict {
        if !self.served.load(Ordering::Acquire) {
            let deadline = self.accepted + limits.handshake_timeout;
            return if now >= deadline {
                Verdict::Close("no request within the handshake timeout")
            } else {
                Verdict::CheckAt(deadline)
            };
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::CheckAt(now + limits.idle_timeout);
        }
        let deadline = *self.idle_since() + limits.idle_timeout;
        if now >= deadline {
            Verdict::Close("idle with no request or stream for the idle timeout")
        } else {
            Verdict::CheckAt(deadline)
        }
    }
}

/// What one uid may send, over all its connections: 2 MiB a second after a
/// burst of 8 MiB, counting raw bytes and decoded header bytes. A
/// legitimate request is a few hundred bytes (a task Begin with its most
/// attributes about 35 KiB), so only a flood meets the limit, and it is then
/// slowed down (its reads wait), not served faster than this. It bounds what
/// one uid can make the daemon decode (HPACK, HTTP/2 frames, protobuf)
/// whatever it sends, so other users keep their share.
pub const CLIENT_BYTES_PER_SECOND: u64 = 2 << 20; // 2 MiB/s per uid
/// See [`CLIENT_BYTES_PER_SECOND`].
pub const CLIENT_BYTES_BURST: u64 = 8 << 20; // 8 MiB per uid
/// What a new connection costs against its uid's allowance: accepting and
/// pinning the peer are work too, so a client that reconnects in a loop is
/// slowed like one that floods: 2,048 new connections at once, then 512 a
/// second (a thousand agents of one uid starting together are served; a
/// churn loop is refused at accept, for a few microseconds each).
pub const CONNECTION_COST_BYTES: usize = 4 << 10; // 4 KiB

/// Open connections per uid, to cap them, and each uid's byte allowance.
#[derive(Debug, Default)]
struct UidCounts {
    open: HashMap<u32, usize>,
    /// When each uid's allowance is full again (GCRA); absent: full now.
    full_at: HashMap<u32, Instant>,
}

/// How long one byte of allowance takes to come back.
const fn nanos_per_byte() -> u64 {
    1_000_000_000 / CLIENT_BYTES_PER_SECOND
}

impl UidCounts {
    /// Charges `bytes` to `uid` at `now`; the allowance may go into debt.
    fn charge(&mut self, uid: u32, bytes: u64, now: Instant) {
        let full_at = self
            .full_at
            .get(&uid)
            .copied()
            .filter(|t| *t > now)
            .unwrap_or(now);
        let cost = Duration::from_nanos(bytes.saturating_mul(nanos_per_byte()));
        self.full_at.insert(uid, full_at + cost);
        if self.full_at.len() > 1024 {
            // Forget uids whose allowance is full again: they start full.
            self.full_at.retain(|_, t| *t > now);
        }
    }

    /// When `uid` may read again, if it is over its burst now.
    fn resume_at(&self, uid: u32, now: Instant) -> Option<Instant> {
        let window = Duration::from_nanos(CLIENT_BYTES_BURST.saturating_mul(nanos_per_byte()));
        let full_at = *self.full_at.get(&uid)?;
        let resume = full_at.checked_sub(window)?;
        (resume > now).then_some(resume)
    }
}

/// Counts the connections of each uid.
#[derive(Clone, Debug, Default)]
struct ConnectionLimiter {
    counts: Arc<Mutex<UidCounts>>,
}

impl ConnectionLimiter {
    fn counts(&self) -> std::sync::MutexGuard<'_, UidCounts> {
        // Counters only: a poisoned lock still holds usable numbers.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more connection of `uid`, unless it holds `max`.
    fn try_acquire(&self, uid: u32, max: usize) -> Option<UidSlot> {
        let mut counts = self.counts();
        let open = counts.open.entry(uid).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(UidSlot {
            uid,
            limiter: self.clone(),
        })
    }

    /// Connections `uid` holds open now.
    #[cfg(test)]
    fn open(&self, uid: u32) -> usize {
        self.counts().open.get(&uid).copied().unwrap_or(0)
    }
}

/// One uid's claim on a connection; released on drop.
#[derive(Debug)]
struct UidSlot {
    uid: u32,
    limiter: ConnectionLimiter,
}

impl UidSlot {
    fn charge(&self, bytes: usize, now: Instant) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.limiter.counts().charge(self.uid, bytes, now);
    }

    fn resume_at(&self, now: Instant) -> Option<Instant> {
        self.limiter.counts().resume_at(self.uid, now)
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts();
        if let Some(open) = counts.open.get_mut(&self.uid) {
            *open -= 1;
            if *open == 0 {
                counts.open.remove(&self.uid);
            }
        }
    }
}

/// A `UnixStream` whose reads say who wrote the bytes, with a watchdog.
pub struct AcceptedStream {
    inner: UnixStream,
    conn: Arc<Connection>,
    limits: ClientLimits,
    watchdog: Pin<Box<Sleep>>,
    /// Set while the uid is over its byte allowance.
    throttle: Option<Pin<Box<Sleep>>>,
}

impl AcceptedStream {
    /// Closes the connection (by failing the read) once the watchdog says so.
    fn poll_watchdog(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.watchdog.as_mut().poll(cx).is_ready() {
            match self.conn.activity.verdict(Instant::now(), &self.limits) {
                Verdict::CheckAt(at) => self.watchdog.as_mut().reset(at),
                Verdict::Close(why) => {
                    tracing::debug!(pid = self.conn.peer_pid(), why, "closing a connection");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
            }
        }
        Ok(())
    }
}

impl AcceptedStream {
    /// Waits while the connection's uid is over its byte allowance.
    fn poll_allowance(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(throttle) = self.throttle.as_mut() {
                ready!(throttle.as_mut().poll(cx));
                self.throttle = None;
            }
            match self.conn.slot.resume_at(Instant::now()) {
                Some(at) => self.throttle = Some(Box::pin(tokio::time::sleep_until(at))),
                None => return Poll::Ready(()),
            }
        }
    }
}

impl Connected for AcceptedStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            conn: self.conn.clone(),
        }
    }
}

impl AsyncRead for AcceptedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.poll_watchdog(cx)?;
        ready!(this.poll_allowance(cx));
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let inner = &this.inner;
            let unfilled = buf.initialize_unfilled();
            match inner.try_io(Interest::READABLE, || {
                attest::socket::read_with_writer(inner.as_fd(), unfilled)
            }) {
                Ok((n, writer)) => {
                    if n > 0 {
                        this.conn.note_writer(writer);
                        this.conn.slot.charge(n, Instant::now());
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
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

/// How long the accept loop pauses after an accept error (e.g. out of file
/// descriptors) before trying again, instead of spinning or giving up.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The stream of accepted connections tonic serves. Accept errors are
/// logged and retried, never passed on: tonic would stop serving on them.
/// A uid over its connection cap has the new connection closed at once.
pub struct Incoming {
    listener: UnixListener,
    limits: ClientLimits,
    limiter: ConnectionLimiter,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Serves connections accepted on `listener` within `limits`. The
    /// listener gets SO_PASSCRED, which accepted sockets inherit.
    ///
    /// # Errors
    /// When SO_PASSCRED cannot be set or sock_diag does not answer: without
    /// them nobody could tell who wrote a request or who holds a connection,
    /// so the daemon must not serve.
    pub fn new(listener: UnixListener, limits: ClientLimits) -> io::Result<Self> {
        attest::socket::pass_credentials(&listener)?;
        // Without sock_diag no private key could ever be sent (the holder
        // check fails closed): say so at start rather than refuse every agent.
        let (probe, _other) = std::os::unix::net::UnixStream::pair()?;
        attest::socket::peer_inode(&probe).map_err(|e| {
            io::Error::other(format!(
                "the kernel's sock_diag for Unix sockets (unix_diag) does not answer ({e}); \
                 Sigil needs it, and AF_NETLINK, to tell who holds a connection"
            ))
        })?;
        Ok(Self {
            listener,
            limits,
            limiter: ConnectionLimiter::default(),
            pause: None,
        })
    }

    fn admit(&self, inner: UnixStream) -> Option<AcceptedStream> {
        let cred = attest::socket::SocketCred::read(&inner)?;
        let uid = cred.uid;
        let Some(slot) = self
            .limiter
            .try_acquire(uid, self.limits.max_connections_per_uid)
        else {
            tracing::debug!(
                uid,
                max = self.limits.max_connections_per_uid,
                "connection refused: the uid holds its maximum of open connections"
            );
            return None;
        };
        let now = Instant::now();
        if slot.resume_at(now).is_some() {
            tracing::debug!(
                uid,
                "connection refused: the uid is over its byte allowance"
            );
            return None;
        }
        slot.charge(CONNECTION_COST_BYTES, now);
        let conn = Arc::new(Connection {
            accepted: Accepted::read(&inner, cred),
            early_request: AtomicBool::new(false),
            sole_holder: tokio::sync::OnceCell::new(),
            foreign_writer: AtomicU32::new(0),
            activity: Activity::new(now),
            slot,
        });
        Some(AcceptedStream {
            inner,
            conn,
            limits: self.limits,
            watchdog: Box::pin(tokio::time::sleep_until(now)),
            throttle: None,
        })
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
                    if let Some(stream) = self.admit(inner) {
                        let (billed, early) = (stream.conn.clone(), stream.conn.clone());
                        let fix = AuthorityFix::new(stream)
                            .charging(move |decoded| billed.slot.charge(decoded, Instant::now()))
                            .watching_early_headers(early.accepted.queued_at_pin, move || {
                                early.early_request.store(true, Ordering::Release);
                            });
                        return Poll::Ready(Some(Ok(fix)));
                    }
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

    fn limits() -> ClientLimits {
        ClientLimits {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            ..ClientLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_closed_after_the_handshake_timeout() {
        let activity = Activity::new(Instant::now());
        let start = Instant::now();
        assert_eq!(
            activity.verdict(start, &limits()),
            Verdict::CheckAt(start + Duration::from_secs(5))
        );
        assert!(matches!(
            activity.verdict(start + Duration::from_secs(5), &limits()),
            Verdict::Close(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_stays_while_a_stream_is_open_then_closes_when_idle() {
        let activity = Activity::new(Instant::now());
        activity.served.store(true, Ordering::Release);
        activity.in_flight.store(1, Ordering::Release);
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(matches!(
            activity.verdict(later, &limits()),
            Verdict::CheckAt(_)
        ));
        activity.in_flight.store(0, Ordering::Release);
        *activity.idle_since() = later;
        assert!(matches!(
            activity.verdict(later + Duration::from_secs(59), &limits()),
            Verdict::CheckAt(_)
        ));
        assert!(matches!(
            activity.verdict(later + Duration::from_secs(60), &limits()),
            Verdict::Close(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_uid_over_its_burst_waits_for_its_allowance_and_others_do_not() {
        let mut counts = UidCounts::default();
        let now = Instant::now();
        counts.charge(7, CLIENT_BYTES_BURST, now);
        assert_eq!(
            counts.resume_at(7, now),
            None,
            "the burst itself is allowed"
        );
        counts.charge(7, CLIENT_BYTES_PER_SECOND, now);
        let resume = counts.resume_at(7, now).unwrap();
        let wait = resume - now;
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_secs(1),
            "a second's worth over the burst waits a second: {wait:?}"
        );
        assert_eq!(counts.resume_at(8, now), None, "other uids are not slowed");
        assert_eq!(counts.resume_at(7, resume), None);
    }

    #[test]
    fn a_uid_gets_at_most_its_cap_of_connections_and_slots_are_given_back() {
        let limiter = ConnectionLimiter::default();
        let a = limiter.try_acquire(7, 2).unwrap();
        let _b = limiter.try_acquire(7, 2).unwrap();
        assert!(limiter.try_acquire(7, 2).is_none());
        assert!(limiter.try_acquire(8, 2).is_some(), "other uids unaffected");
        drop(a);
        assert_eq!(limiter.open(7), 1);
        assert!(limiter.try_acquire(7, 2).is_some());
    }
}
