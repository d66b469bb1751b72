"""TLS contexts built from the live SVID, bundle and CRL.

`SvidContext` is an `ssl.SSLContext` that holds no certificate of its own:
every connection it wraps (`wrap_socket`, `wrap_bio`, which is what `ssl`,
`asyncio`, anyio, httpx and httpx2 call) gets a real context built from the
material current at that moment, cached until the material changes. So a
rotation, a new CRL or an ended task take effect on the next connection and
a context handed to an HTTP client once never goes stale.

What each handshake checks, the way the SPIFFE X.509-SVID standard says:
the peer's chain must verify against the bundle of the pattern's trust
domain only (a federated CA cannot vouch for our IDs), its leaf must not be
on Sigil's CRL (OpenSSL checks the CRL's signature too), and the SPIFFE ID
in its URI SAN must match the pattern (`PeerNotAllowed` otherwise). Hostname
checks are off: an SVID names a workload, not a host.

The private key never touches disk: it is handed to OpenSSL through a
memfd (anonymous memory, close-on-exec) that is closed as soon as it is
loaded.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import PeerNotAllowed
from .pattern import IdPattern


@dataclass(frozen=True)
class Material:
    """What one context is built from. `version` changes whenever any part does."""

    version: tuple[int, int]
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes
    authorities: tuple[x509.Certificate, ...]
    crls: tuple[bytes, ...]  # DER


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The SPIFFE ID of a leaf: its one `spiffe://` URI SAN, else None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(uris) == 1 and len(spiffe) == 1 else None


def _memfd_path(name: str, data: bytes) -> tuple[int, str]:
    """An anonymous in-memory file holding `data`, and a path OpenSSL can open."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"


def _check_peer(context: ssl.SSLContext, der: bytes | None) -> None:
    patterns: Sequence[IdPattern] = getattr(context, "_sigil_allow", ())
    if der is None:
        raise PeerNotAllowed("the peer presented no certificate")
    spiffe_id = spiffe_id_of(x509.load_der_x509_certificate(der))
    if spiffe_id is None:
        raise PeerNotAllowed("the peer's certificate is not an X.509-SVID (no single spiffe:// URI SAN)")
    if not any(p.matches(spiffe_id) for p in patterns):
        allowed = ", ".join(str(p) for p in patterns)
        raise PeerNotAllowed(f"peer {spiffe_id} is not allowed (allowed: {allowed})")


class _CheckedSSLSocket(ssl.SSLSocket):
    """An SSLSocket that checks the peer's SPIFFE ID after each handshake."""

    _sigil_factory: SvidContext | None = None

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self.context, self.getpeercert(binary_form=True))

    def accept(self) -> tuple[ssl.SSLSocket, Any]:
        # A listening socket wraps each accepted connection with the context
        # current now, not the one it was wrapped with.
        factory = self._sigil_factory
        if factory is None:
            return super().accept()
        sock, addr = socket.socket.accept(self)
        return (
            factory.wrap_socket(
                sock,
                server_side=True,
                do_handshake_on_connect=getattr(self, "do_handshake_on_connect", True),
                suppress_ragged_eofs=getattr(self, "suppress_ragged_eofs", True),
            ),
            addr,
        )


class _CheckedSSLObject(ssl.SSLObject):
    """An SSLObject (asyncio, anyio) that checks the peer's SPIFFE ID."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self.context, self.getpeercert(binary_form=True))


def build(material: Material, *, server_side: bool, allow: Sequence[IdPattern], alpn: Sequence[str] | None) -> ssl.SSLContext:
    """A plain `ssl.SSLContext` presenting `material`'s SVID and checking peers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslsocket_class = _CheckedSSLSocket
    ctx.sslobject_class = _CheckedSSLObject
    ctx._sigil_allow = tuple(allow)  # type: ignore[attr-defined]
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.load_verify_locations(
        cadata=b"".join(c.public_bytes(serialization.Encoding.DER) for c in material.authorities)
    )
    if material.crls:
        pem = b"".join(
            x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM) for der in material.crls
        )
        fd, path = _memfd_path("sigil-crl", pem)
        try:
            ctx.load_verify_locations(cafile=path)
        finally:
            os.close(fd)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in material.chain)
    fd, path = _memfd_path("sigil-svid", chain + material.key_pem)
    try:
        ctx.load_cert_chain(path)
    finally:
        os.close(fd)
    return ctx


class SvidContext(ssl.SSLContext):
    """An `ssl.SSLContext` for SVID mTLS that stays current (see the module
    docs). Made by `Agent.ssl_context`, `Task.ssl_context` and
    `Agent.server_ssl_context`; use it wherever an `ssl.SSLContext` goes.

    Only ALPN (`set_alpn_protocols`) is carried over to the per-connection
    contexts; other settings made on this object are not."""

    _sigil_material: Callable[[], Material]
    _sigil_server_side: bool
    _sigil_allow: tuple[IdPattern, ...]

    def __new__(
        cls,
        material: Callable[[], Material],
        *,
        server_side: bool,
        allow: Sequence[IdPattern],
    ) -> SvidContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)

    def __init__(
        self,
        material: Callable[[], Material],
        *,
        server_side: bool,
        allow: Sequence[IdPattern],
    ) -> None:
        super().__init__()
        self.check_hostname = False
        self.verify_mode = ssl.CERT_REQUIRED
        self._sigil_material = material
        self._sigil_server_side = server_side
        self._sigil_allow = tuple(allow)
        self._sigil_alpn: list[str] | None = None
        self._sigil_lock = threading.Lock()
        self._sigil_cached: tuple[tuple[int, int], list[str] | None, ssl.SSLContext] | None = None

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        super().set_alpn_protocols(alpn_protocols)
        with self._sigil_lock:
            self._sigil_alpn = list(alpn_protocols)

    def current(self) -> ssl.SSLContext:
        """The context for a connection made now."""
        material = self._sigil_material()
        with self._sigil_lock:
            cached = self._sigil_cached
            alpn = self._sigil_alpn
            if cached is not None and cached[0] == material.version and cached[1] == alpn:
                return cached[2]
            ctx = build(material, server_side=self._sigil_server_side, allow=self._sigil_allow, alpn=alpn)
            self._sigil_cached = (material.version, alpn, ctx)
            return ctx

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        ctx = self.current()
        wrapped = ctx.wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )
        if isinstance(wrapped, _CheckedSSLSocket):
            wrapped._sigil_factory = self
        return wrapped

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.current().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
