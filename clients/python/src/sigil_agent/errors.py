"""The exceptions `sigil_agent` raises, each carrying the daemon's reason.

Every error is a `SigilError`; catch that to handle them all. gRPC errors
never escape raw: the status code is kept in `code` (its name, e.g.
`"PERMISSION_DENIED"`) and the daemon's message, which names the fix, in
`reason`.
"""

from __future__ import annotations

import ssl


class SigilError(Exception):
    """Something Sigil (or the way to it) refused or could not do."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class DaemonUnavailable(SigilError):
    """The Workload API socket is missing, is not a socket, or did not answer."""


class NotAttested(SigilError):
    """The daemon answered but gives this process no identity (no entry matches
    it, or it is refused); `reason` is the daemon's."""


class TaskRefused(SigilError):
    """Begin was refused: e.g. self-declared tasks are off for the entry, the
    TTL exceeds the entry's `tasks.max_ttl`, too many live tasks, a bad task
    id or attributes. `reason` is the daemon's."""


class TaskError(SigilError):
    """A task could not be ended, or its SVID did not reach this process in time."""


class TaskEnded(SigilError):
    """The task has ended (End, TTL or an operator's revocation): its SVID is
    gone and can no longer be used for new connections."""


class PeerNotAllowed(ssl.SSLCertVerificationError):
    """The peer's certificate chained to the bundle and is not revoked, but its
    SPIFFE ID does not match the pattern this context allows. Raised from the
    TLS handshake, so HTTP clients report it as a connection error."""
