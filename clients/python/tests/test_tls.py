"""mTLS with the SDK's contexts against a real daemon: a client context that
survives rotations, servers that check the client's SPIFFE ID, and Sigil's
CRL enforced by the SDK on both sides."""

from __future__ import annotations

import http.server
import os
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import TRUST_DOMAIN, Daemon, entries, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sigil_agent import Agent, PeerNotAllowed, SvidContext, TaskEnded

TASKS = f"spiffe://{TRUST_DOMAIN}/agent/agent/instance/*/task/*"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers with the client's SPIFFE ID and serial, as the server saw them."""

    protocol_version = "HTTP/1.0"  # one request per connection: each call handshakes anew

    def do_GET(self) -> None:
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        cert = x509.load_der_x509_certificate(der)
        uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )[0]
        body = json.dumps({"client_id": uri, "client_serial": cert.serial_number}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def https_server(context: ssl.SSLContext) -> Iterator[str]:
    """A threaded stdlib HTTPS server on 127.0.0.1; yields its URL. Failed
    handshakes are counted in `server.refused`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.refused = []  # type: ignore[attr-defined]

    def handle_error(request: Any, client_address: Any) -> None:
        import sys

        server.refused.append(sys.exc_info()[1])  # type: ignore[attr-defined]

    server.handle_error = handle_error  # type: ignore[method-assign]
    accept = server.get_request

    def get_request() -> Any:
        # The handshake runs in accept(): socketserver drops its errors.
        try:
            return accept()
        except OSError as err:
            server.refused.append(err)  # type: ignore[attr-defined]
            raise

    server.get_request = get_request  # type: ignore[method-assign]
    https_server.refused = server.refused  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def keep_on_disk(svid: Any, into: Path) -> tuple[str, str]:
    """What an attacker who copied a task's key would hold (test only)."""
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (into / "chain.pem").write_bytes(chain)
    (into / "key.pem").write_bytes(key)
    return str(into / "chain.pem"), str(into / "key.pem")


def test_a_client_context_survives_three_rotations(daemon_factory: Any) -> None:
    # Task SVIDs last 4 s and rotate at about half that; the task lasts longer.
    d: Daemon = daemon_factory('[svid]\ninstance_ttl = "4s"\ntask_ttl = "4s"\n' + entries())
    with Agent(d.endpoint) as agent, agent.task("rotating", ttl=timedelta(minutes=5)) as task:
        server_ctx = agent.server_ssl_context(TASKS)
        with https_server(server_ctx) as url, task.httpx_client(server_id=f"spiffe://{TRUST_DOMAIN}/agent/agent/**") as http:
            client_serials: set[int] = set()
            server_serials: set[int] = set()
            calls = 0

            def call() -> bool:
                nonlocal calls
                response = http.get(url)
                calls += 1
                assert response.status_code == 200
                seen = response.json()
                assert seen["client_id"] == task.spiffe_id
                client_serials.add(seen["client_serial"])
                server_serials.add(agent.svid.leaf.serial_number)
                return len(client_serials) >= 4

            assert wait_until(call, timeout=30, step=0.2), f"rotations seen: {len(client_serials) - 1}"
            # The same client object: its context was never rebuilt by hand.
            assert len(server_serials) >= 3, server_serials
            assert calls >= 4


def test_the_server_side_refuses_a_revoked_client_and_a_wrong_id(daemon: Daemon, tmp_path: Path) -> None:
    with Agent() as agent, https_server(agent.server_ssl_context(TASKS)) as url:
        port = int(url.rsplit(":", 1)[1])
        with agent.task("to-revoke") as task:
            chain, key = keep_on_disk(task.svid, tmp_path)
            serial = task.svid.leaf.serial_number
            # A plain client holding the task's cert and key: served now.
            plain = plain_context(chain, key, agent, server_side=False)
            assert get_status(plain, port) == 200
        assert wait_until(lambda: serial in daemon.crl_serials(), 2)
        # End revoked it: the same cert and key are refused at the handshake
        # as soon as the CRL reaches the server's context.
        assert wait_until(lambda: get_status(plain, port) is None, 2), "a revoked client was still served"
        # The client may see the alert before the server thread records why.
        assert wait_until(lambda: len(https_server.refused) > 0, 2)
        refusal = https_server.refused[-1]
        assert isinstance(refusal, ssl.SSLCertVerificationError), refusal
        assert "revoked" in str(refusal), refusal
        # The instance SVID chains and is not revoked, but is no task: refused by ID.
        before = len(https_server.refused)
        with httpx2.Client(verify=agent.ssl_context()) as http:
            # TLS 1.3: the client's handshake is over before the server checks
            # the ID, so the client sees the server hang up.
            with pytest.raises(httpx2.TransportError):
                http.get(url)
        assert wait_until(lambda: len(https_server.refused) > before, 2)
        assert isinstance(https_server.refused[-1], PeerNotAllowed), https_server.refused[-1]


def test_the_client_side_refuses_a_revoked_server_and_a_wrong_id(daemon: Daemon, tmp_path: Path) -> None:
    with Agent() as agent:
        with agent.task("server-task") as task:
            chain, key = keep_on_disk(task.svid, tmp_path)
            serial = task.svid.leaf.serial_number
            server = plain_context(chain, key, agent, server_side=True)
            with https_server(server) as url:
                with httpx2.Client(verify=agent.ssl_context(TASKS)) as http:
                    assert http.get(url).json()["client_id"] == agent.spiffe_id
                # The client wants another ID: PeerNotAllowed from the handshake.
                with httpx2.Client(verify=agent.ssl_context(f"spiffe://{TRUST_DOMAIN}/gate/*")) as http:
                    with pytest.raises(httpx2.ConnectError) as refused:
                        http.get(url)
                    assert "is not allowed" in str(refused.value), refused.value
        assert wait_until(lambda: serial in daemon.crl_serials(), 2)
        # The ended task's certificate, still in a server's hands: refused.
        with https_server(server) as url, httpx2.Client(verify=agent.ssl_context(TASKS)) as http:

            def refused() -> bool:
                try:
                    http.get(url)
                    return False
                except httpx2.ConnectError as err:
                    assert "revoked" in str(err), err
                    return True

            assert wait_until(refused, 2), "a revoked server was trusted"
        # An ended task's own contexts refuse to start new connections.
        with pytest.raises(TaskEnded):
            task.ssl_context()


def test_asyncio_server_and_client_contexts(daemon: Daemon) -> None:
    """asyncio's TLS (SSLObject via wrap_bio) gets the same checks."""
    import asyncio

    async def main() -> tuple[bytes, bool]:
        with Agent() as agent:
            seen: list[str] = []

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                seen.append(str(x509.load_der_x509_certificate(der).serial_number))
                writer.write(b"hello " + agent.spiffe_id.encode())
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=agent.server_ssl_context(f"spiffe://{TRUST_DOMAIN}"))
            port = server.sockets[0].getsockname()[1]
            async with server:
                with agent.task("async-tls") as task:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=task.ssl_context(agent.spiffe_id), server_hostname="sigil"
                    )
                    data = await reader.read()
                    writer.close()
                    # A client that wants another server ID refuses this one.
                    try:
                        await asyncio.open_connection(
                            "127.0.0.1", port, ssl=task.ssl_context(f"{agent.spiffe_id}/task/nope"), server_hostname="sigil"
                        )
                        wrong_refused = False
                    except PeerNotAllowed:
                        wrong_refused = True
            return data, wrong_refused

    data, wrong_refused = asyncio.run(main())
    assert data.startswith(b"hello spiffe://")
    assert wrong_refused


def plain_context(chain: str, key: str, agent: Agent, server_side: bool) -> ssl.SSLContext:
    """A stdlib context with a certificate and key from files, trusting the bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    bundle = next(iter(agent.x509_context().x509_bundle_set.bundles))
    ctx.load_verify_locations(
        cadata=b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities)
    )
    ctx.load_cert_chain(chain, key)
    return ctx


def get_status(ctx: ssl.SSLContext, port: int) -> int | None:
    """One HTTP/1.0 GET over a new TLS connection: the status, or None when
    the server refused the connection (at or right after the handshake)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    except (ssl.SSLError, ConnectionError):
        return None
    return int(data.split(b" ", 2)[1]) if data else None


def test_the_key_never_touches_disk(daemon: Daemon, tmp_path: Path) -> None:
    """A child agent builds task and instance contexts and serves and makes
    a TLS call, under strace: no file is opened for writing, created,
    renamed or linked, and the certificate and key go through memfds."""
    import shutil
    import subprocess
    import sys

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    child = tmp_path / "child.py"
    child.write_text(
        "import asyncio\n"
        "from sigil_agent import Agent\n"
        "async def main():\n"
        "    with Agent() as agent, agent.task('no-disk') as task:\n"
        "        async def serve(r, w):\n"
        "            w.write(b'ok'); await w.drain(); w.close()\n"
        "        server = await asyncio.start_server(serve, '127.0.0.1', 0, ssl=agent.server_ssl_context(task.spiffe_id))\n"
        "        port = server.sockets[0].getsockname()[1]\n"
        "        r, w = await asyncio.open_connection('127.0.0.1', port, ssl=task.ssl_context(agent.spiffe_id), server_hostname='x')\n"
        "        print((await r.read()).decode()); w.close(); server.close()\n"
        "asyncio.run(main())\n"
    )
    trace = tmp_path / "trace.txt"
    done = subprocess.run(
        [strace, "-f", "-qq", "-o", str(trace), "-e",
         "trace=open,openat,openat2,creat,memfd_create,rename,renameat,renameat2,link,linkat,symlink,symlinkat",
         sys.executable, str(child)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    calls = trace.read_text().splitlines()
    writes = [c for c in calls if ("open" in c and "O_RDONLY" not in c and "ENOENT" not in c) or "creat(" in c
              or "rename" in c or "link" in c]
    assert writes == [], writes
    memfds = [c for c in calls if "memfd_create(\"sigil-svid\"" in c]
    assert len(memfds) >= 2, calls


def stranger_svid(into: Path, spiffe_id: str) -> tuple[str, str]:
    """A CA nobody trusts and a leaf it signs that claims `spiffe_id`, as
    files: what an attacker can make without Sigil's key."""
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (into / "stranger.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    (into / "stranger.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(into / "stranger.pem"), str(into / "stranger.key")


def test_a_stranger_cas_svid_is_refused_on_both_sides(daemon: Daemon, tmp_path: Path) -> None:
    with Agent() as agent:
        claimed = f"{agent.spiffe_id}/task/forged"
        chain, key = stranger_svid(tmp_path, claimed)
        # A client with the forged SVID against the SDK's server.
        with https_server(agent.server_ssl_context(TASKS)) as url:
            port = int(url.rsplit(":", 1)[1])
            before = len(https_server.refused)
            assert get_status(plain_context(chain, key, agent, server_side=False), port) is None
            assert wait_until(lambda: len(https_server.refused) > before, 2)
            assert "certificate verify failed" in str(https_server.refused[-1]), https_server.refused[-1]
        # A server with the forged SVID against the SDK's client.
        with https_server(plain_context(chain, key, agent, server_side=True)) as url:
            with httpx2.Client(verify=agent.ssl_context(TASKS)) as http:
                with pytest.raises(httpx2.ConnectError, match="certificate verify failed"):
                    http.get(url)
