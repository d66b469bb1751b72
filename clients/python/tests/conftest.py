"""Fixtures: a real Sigil daemon (`sigil run`) per test that needs one.

`SIGIL_BIN` names the `sigil` binary (the Rust test `tests/sdk_python.rs`
sets it to the one Cargo built). Each daemon gets its own config, socket and
state directory under a fresh temporary directory, and is stopped (SIGTERM)
after the test. Entries: `agent` matches this Python interpreter run by
this uid (the tests, the examples they start), `gate` the sigil binary.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe._proto import workload_pb2, workload_pb2_grpc

TRUST_DOMAIN = "sigil.test"
REPO = Path(__file__).resolve().parents[3]
HEADER = (("workload.spiffe.io", "true"),)


def sigil_bin() -> str:
    path = os.environ.get("SIGIL_BIN")
    if not path:
        pytest.exit("set SIGIL_BIN to the sigil binary (cargo build; target/debug/sigil)", returncode=2)
    return os.path.realpath(path)


def entries(agent_tasks: str = "self_declare = true\nmax_ttl = \"10m\"\nmax_concurrent = 4") -> str:
    uid = os.geteuid()
    python = os.path.realpath(sys.executable)
    return (
        f'[[entry]]\nname = "agent"\nselectors = ["unix:uid:{uid}", "unix:path:{python}"]\n'
        f"[entry.tasks]\n{agent_tasks}\n"
        f'[[entry]]\nname = "gate"\nselectors = ["unix:uid:{uid}", "unix:path:{sigil_bin()}"]\n'
    )


@dataclass
class Daemon:
    dir: Path
    socket: Path
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def admin_socket(self) -> Path:
        return self.socket.with_name("admin.sock")

    def crl_serials(self) -> set[int]:
        """The serials on the CRL as a verifier reads it (FetchX509Bundles),
        read with grpc and cryptography, not with the package under test."""
        with grpc.insecure_channel(self.endpoint) as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            call = stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10)
            first = next(iter(call))
            call.cancel()
        return {entry.serial_number for der in first.crl for entry in x509.load_der_x509_crl(der)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_daemon(config: str) -> Daemon:
    # Short, private paths: a Unix socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="sigil-sdk-"))
    (base / "sigil.toml").write_text(f'trust_domain = "{TRUST_DOMAIN}"\n{config}')
    sock = base / "workload.sock"
    log = open(base / "daemon.log", "wb")
    process = subprocess.Popen(
        [sigil_bin(), "run", "--config", str(base / "sigil.toml"), "--socket", str(sock), "--state-dir", str(base / "state")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"},
    )
    daemon = Daemon(base, sock, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sigil run exited: {(base / 'daemon.log').read_text()}")
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                return daemon
            except OSError:
                pass
        time.sleep(0.05)
    daemon.stop()
    raise RuntimeError(f"sigil run did not listen within 20 s: {(base / 'daemon.log').read_text()}")


@pytest.fixture
def daemon_factory() -> Iterator[object]:
    started: list[Daemon] = []

    def start(config: str | None = None) -> Daemon:
        daemon = start_daemon(entries() if config is None else config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: object, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """A daemon admitting this process, its socket in SPIFFE_ENDPOINT_SOCKET."""
    d: Daemon = daemon_factory()  # type: ignore[operator]
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", d.endpoint)
    return d


def wait_until(check: object, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False
