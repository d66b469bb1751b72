"""`Agent`: this process's identity from Sigil, and its tasks.

One `Agent` per process. It keeps two Workload API streams open, both from
the daemon on `SPIFFE_ENDPOINT_SOCKET`:
- the X.509 SVIDs (py-spiffe's `WorkloadApiClient.stream_x509_contexts`):
  the instance SVID and one SVID per live task, each replaced on rotation;
- the bundles and CRL (`FetchX509Bundles`, opened on the first TLS context),
  because Sigil sends the CRL to verifiers only.
Tasks are begun and ended over Sigil's task extension (`sigil.workload.v1.Tasks`,
stubs shipped in `sigil_agent._pb`). Every call carries the
`workload.spiffe.io: true` header; the daemon attests the caller from the
kernel's facts, so an `Agent` can only ever hold this process's identities.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient, X509Svid
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.workloadapi.x509_context import X509Context

from ._pb import tasks_pb2, tasks_pb2_grpc
from .errors import (
    DaemonUnavailable,
    NotAttested,
    SigilError,
    TaskEnded,
    TaskError,
    TaskRefused,
)
from .pattern import IdPattern
from .tls import Material, SvidContext

if TYPE_CHECKING:
    import httpx2

_log = logging.getLogger("sigil_agent")

HEADER = (("workload.spiffe.io", "true"),)
# Codes with which the daemon refuses a Begin for a reason the caller can fix.
_REFUSED = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}


def _endpoint(socket: str | None) -> tuple[str, str]:
    """The endpoint URI and the socket path, checked: a clear error for a
    missing variable, a missing file and a file that is not a socket."""
    value = socket if socket is not None else os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    if not value:
        raise DaemonUnavailable(
            "SPIFFE_ENDPOINT_SOCKET is not set: export it to the daemon's socket, "
            "e.g. SPIFFE_ENDPOINT_SOCKET=unix:///run/sigil/workload.sock (see `sigil run`'s first log line)"
        )
    if value.startswith("unix://"):
        path = value[len("unix://") :]
    elif value.startswith("unix:"):
        path = value[len("unix:") :]
    elif value.startswith("/"):
        path = value
    else:
        raise DaemonUnavailable(f"{value!r} is not a Unix socket: give unix:///path/to/workload.sock")
    path = "/" + path.lstrip("/")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DaemonUnavailable(
            f"no socket at {path}: is the daemon running, and is this the socket it printed?"
        ) from None
    except PermissionError:
        raise DaemonUnavailable(f"cannot reach {path}: permission denied on its directory") from None
    if not stat.S_ISSOCK(mode):
        raise DaemonUnavailable(f"{path} is not a socket: point SPIFFE_ENDPOINT_SOCKET at the daemon's workload.sock")
    return f"unix://{path}", path


def _refusal(err: grpc.RpcError) -> tuple[str, str]:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    return (code.name if code is not None else "UNKNOWN", details or str(err))


def _as_utc(ts: Any) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


@dataclass(frozen=True)
class TaskInfo:
    """A task as the daemon describes it."""

    task_id: str
    spiffe_id: str
    started_at: datetime
    expires_at: datetime
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def _of(cls, pb: Any) -> TaskInfo:
        return cls(
            task_id=pb.task_id,
            spiffe_id=pb.spiffe_id,
            started_at=_as_utc(pb.started_at),
            expires_at=_as_utc(pb.expires_at),
            attributes=dict(pb.attributes),
        )


class Agent:
    """This process's identity from Sigil.

    `Agent()` connects to `SPIFFE_ENDPOINT_SOCKET` (or `socket`), waits up to
    `timeout` seconds for the first SVIDs and raises `DaemonUnavailable` or
    `NotAttested` (with the daemon's reason) if it gets none. Close it (or use
    `with Agent() as agent:`) to end its streams.
    """

    def __init__(self, socket: str | None = None, *, timeout: float = 10.0) -> None:
        self.endpoint, self.socket_path = _endpoint(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.endpoint)
        self._tasks = tasks_pb2_grpc.TasksStub(self._channel)  # type: ignore[no-untyped-call]
        self._workload = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)  # type: ignore[no-untyped-call]
        self._cond = threading.Condition()
        self._context: X509Context | None = None
        self._context_seq = 0
        self._stream_error: Exception | None = None
        self._crls: tuple[bytes, ...] = ()
        self._crl_seq = 0
        self._bundles_started = False
        self._bundles_ready = False
        self._bundles_error: str | None = None
        self._bundles_call: Any = None
        self._closed = False
        try:
            self._probe()
            self._client = WorkloadApiClient(self.endpoint)
            self._cancel = self._client.stream_x509_contexts(self._on_context, self._on_stream_error)
            with self._cond:
                if not self._cond.wait_for(lambda: self._context is not None or self._stream_error is not None, timeout):
                    raise DaemonUnavailable(f"no SVID from {self.socket_path} within {timeout} s")
                if self._context is None:
                    raise DaemonUnavailable(f"the SVID stream failed: {self._stream_error}")
        except BaseException:
            self.close()
            raise

    # --- The streams ------------------------------------------------------------------

    def _probe(self) -> None:
        """One FetchX509SVID message, for a clear error before streaming: the
        py-spiffe stream only reports a status code, and retries refusals."""
        call = self._workload.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=self.timeout
        )
        try:
            next(iter(call))
        except grpc.RpcError as err:
            code, reason = _refusal(err)
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise DaemonUnavailable(f"the daemon at {self.socket_path} did not answer: {reason}", code=code) from None
            raise NotAttested(reason, code=code) from None
        except StopIteration:
            raise DaemonUnavailable("the daemon closed the SVID stream without an answer") from None
        finally:
            call.cancel()

    def _on_context(self, context: X509Context) -> None:
        with self._cond:
            self._context = context
            self._context_seq += 1
            self._stream_error = None
            self._cond.notify_all()

    def _on_stream_error(self, error: Exception) -> None:
        _log.warning("sigil_agent: the SVID stream failed: %s", error)
        with self._cond:
            self._stream_error = error
            self._cond.notify_all()

    def _start_bundles(self) -> None:
        with self._cond:
            if self._bundles_started:
                return
            self._bundles_started = True
        threading.Thread(target=self._watch_bundles, name="sigil-bundles", daemon=True).start()

    def _watch_bundles(self) -> None:
        backoff = 0.1
        while not self._closed:
            try:
                call = self._workload.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
                with self._cond:
                    self._bundles_call = call
                    if self._closed:
                        call.cancel()
                for response in call:
                    with self._cond:
                        self._crls = tuple(response.crl)
                        self._crl_seq += 1
                        self._bundles_ready = True
                        self._bundles_error = None
                        self._cond.notify_all()
                    backoff = 0.1
            except grpc.RpcError as err:
                if self._closed:
                    return
                code, reason = _refusal(err)
                _log.warning("sigil_agent: the bundle stream failed (%s): %s", code, reason)
                with self._cond:
                    self._bundles_error = f"{code}: {reason}"
                    self._cond.notify_all()
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # --- State ---------------------------------------------------------------------

    def x509_context(self) -> X509Context:
        """The live X.509 context: every SVID this process holds (the
        instance's first, then one per live task) and the bundles."""
        with self._cond:
            if self._closed:
                raise SigilError("the Agent is closed")
            if self._stream_error is not None:
                raise DaemonUnavailable(
                    f"the SVID stream from {self.socket_path} failed for good ({self._stream_error}); make a new Agent"
                )
            assert self._context is not None
            return self._context

    @property
    def svid(self) -> X509Svid:
        """The instance SVID (the current one; it rotates)."""
        return self.x509_context().default_svid

    @property
    def spiffe_id(self) -> str:
        """The instance's SPIFFE ID."""
        return str(self.svid.spiffe_id)

    def _svid_for(self, spiffe_id: str) -> X509Svid | None:
        for svid in self.x509_context().x509_svids:
            if str(svid.spiffe_id) == spiffe_id:
                return svid
        return None

    def _material(self, spiffe_id: str | None, trust_domain: str) -> Material:
        with self._cond:
            if not self._cond.wait_for(lambda: self._bundles_ready or self._closed, self.timeout):
                raise DaemonUnavailable(
                    f"no bundle and CRL from {self.socket_path} within {self.timeout} s"
                    + (f" ({self._bundles_error})" if self._bundles_error else "")
                )
            crls, version = self._crls, (self._context_seq, self._crl_seq)
        context = self.x509_context()
        if spiffe_id is None:
            svid = context.default_svid
        else:
            found = [s for s in context.x509_svids if str(s.spiffe_id) == spiffe_id]
            if not found:
                raise TaskEnded(f"{spiffe_id} has ended: its SVID is no longer served to this process")
            svid = found[0]
        bundle = next(
            (b for b in context.x509_bundle_set.bundles if b.trust_domain.name == trust_domain),
            None,
        )
        if bundle is None:
            raise SigilError(f"no bundle for trust domain {trust_domain}: Sigil serves only its own and federated ones")
        key_pem = svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Material(
            version=version,
            chain=tuple(svid.cert_chain),
            key_pem=key_pem,
            authorities=tuple(bundle.x509_authorities),
            crls=crls,
        )

    def _context_for(self, spiffe_id: str | None, patterns: str | Sequence[str] | None, server_side: bool) -> SvidContext:
        own_td = self.svid.spiffe_id.trust_domain.name
        texts = [f"spiffe://{own_td}"] if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)
        if not texts:
            raise ValueError("give at least one SPIFFE ID pattern to allow")
        allow = [IdPattern.parse(t) for t in texts]
        domains = {p.trust_domain for p in allow}
        if len(domains) != 1:
            raise ValueError(f"the patterns name {len(domains)} trust domains; one context verifies one")
        (td,) = domains
        self._start_bundles()
        context = SvidContext(lambda: self._material(spiffe_id, td), server_side=server_side, allow=allow)
        context.current()  # fail now, not on the first connection, if anything is missing
        return context

    # --- TLS -----------------------------------------------------------------------

    def ssl_context(self, server_id: str | Sequence[str] | None = None) -> SvidContext:
        """A client `ssl.SSLContext` presenting the instance SVID. It accepts a
        server whose SVID chains to Sigil's bundle, is not on the CRL and
        whose SPIFFE ID matches `server_id` (a pattern or several: exact,
        `*` one segment, final `**`; default: any ID of this trust domain).
        Always current: each connection uses the SVID, bundle and CRL of
        its moment."""
        return self._context_for(None, server_id, server_side=False)

    def server_ssl_context(self, allow: str | Sequence[str]) -> SvidContext:
        """A server `ssl.SSLContext` presenting the instance SVID and requiring
        a client SVID that chains to the bundle, is not revoked (Sigil's CRL,
        current at each handshake) and matches `allow`."""
        return self._context_for(None, allow, server_side=True)

    # --- Tasks ---------------------------------------------------------------------

    def task(
        self,
        task_id: str = "",
        *,
        ttl: timedelta | float | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> TaskScope:
        """A task for a `with` or `async with` block: Begin on entry (the block
        starts once the task's SVID is on this process's stream), End on exit,
        also on an exception or KeyboardInterrupt. An empty `task_id` lets the
        daemon choose one. `ttl` (a timedelta or seconds) defaults to the
        daemon's `svid.task_ttl`. Raises `TaskRefused` with the daemon's reason."""
        return TaskScope(self, task_id, ttl, attributes or {})

    def begin(
        self,
        task_id: str = "",
        *,
        ttl: timedelta | float | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> Task:
        """Begins a task and waits for its SVID; call `Task.end()` when done
        (or use `task()`, which always does)."""
        request = tasks_pb2.BeginRequest(task_id=task_id, attributes=dict(attributes or {}))
        if ttl is not None:
            seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
            request.ttl.FromTimedelta(timedelta(seconds=seconds))
        try:
            response = self._tasks.Begin(request, metadata=HEADER, timeout=self.timeout)
        except grpc.RpcError as err:
            code, reason = _refusal(err)
            if err.code() in _REFUSED:
                raise TaskRefused(reason, code=code) from None
            raise SigilError(f"Begin failed ({code}): {reason}", code=code) from None
        task = Task(self, TaskInfo._of(response.task))
        try:
            with self._cond:
                arrived = self._cond.wait_for(
                    lambda: self._closed or any(str(s.spiffe_id) == task.spiffe_id for s in self._context.x509_svids),  # type: ignore[union-attr]
                    self.timeout,
                )
            if not arrived or self._closed:
                raise TaskError(f"the SVID of task {task.task_id} did not reach this process within {self.timeout} s")
        except BaseException:
            task.end(missing_ok=True)
            raise
        return task

    def tasks(self) -> list[TaskInfo]:
        """This instance's live tasks, as the daemon lists them."""
        try:
            response = self._tasks.List(tasks_pb2.ListRequest(), metadata=HEADER, timeout=self.timeout)
        except grpc.RpcError as err:
            code, reason = _refusal(err)
            raise SigilError(f"List failed ({code}): {reason}", code=code) from None
        return [TaskInfo._of(t) for t in response.tasks]

    def _end(self, task_id: str, missing_ok: bool) -> TaskInfo | None:
        try:
            response = self._tasks.End(tasks_pb2.EndRequest(task_id=task_id), metadata=HEADER, timeout=self.timeout)
        except grpc.RpcError as err:
            code, reason = _refusal(err)
            if missing_ok and err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise TaskError(f"End of task {task_id} failed ({code}): {reason}", code=code) from None
        return TaskInfo._of(response.task)

    # --- Life ----------------------------------------------------------------------

    def close(self) -> None:
        """Ends the streams. Live tasks are not ended here (their `with`
        blocks do that); the daemon ends them when this process exits."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            call = self._bundles_call
            self._cond.notify_all()
        if call is not None:
            call.cancel()
        cancel = getattr(self, "_cancel", None)
        if cancel is not None:
            cancel.cancel()
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
        self._channel.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Task:
    """A live task: its SPIFFE ID, its current SVID and TLS contexts that
    present it. Its SVID rotates like the instance's; after `end()` (or the
    TTL, or an operator's revocation) it is gone and new connections raise
    `TaskEnded`."""

    def __init__(self, agent: Agent, info: TaskInfo) -> None:
        self.agent = agent
        self.info = info
        self.ended = False

    @property
    def task_id(self) -> str:
        return self.info.task_id

    @property
    def spiffe_id(self) -> str:
        return self.info.spiffe_id

    @property
    def svid(self) -> X509Svid:
        """The task's current SVID (it rotates). Raises `TaskEnded` once gone."""
        svid = self.agent._svid_for(self.spiffe_id)
        if svid is None:
            raise TaskEnded(f"task {self.task_id} has ended: its SVID is no longer served")
        return svid

    def ssl_context(self, server_id: str | Sequence[str] | None = None) -> SvidContext:
        """Like `Agent.ssl_context`, presenting the task's SVID."""
        return self.agent._context_for(self.spiffe_id, server_id, server_side=False)

    def httpx_client(self, server_id: str | Sequence[str] | None = None, **kwargs: Any) -> httpx2.Client:
        """An `httpx2.Client` (install `sigil-agent[httpx]`) whose connections
        present the task's SVID and verify the server as `ssl_context` does."""
        _need_httpx()
        import httpx2

        return httpx2.Client(verify=self.ssl_context(server_id), **kwargs)

    def async_httpx_client(self, server_id: str | Sequence[str] | None = None, **kwargs: Any) -> httpx2.AsyncClient:
        """The `httpx2.AsyncClient` counterpart of `httpx_client`."""
        _need_httpx()
        import httpx2

        return httpx2.AsyncClient(verify=self.ssl_context(server_id), **kwargs)

    def end(self, *, missing_ok: bool = False) -> TaskInfo | None:
        """Ends the task: its SVID leaves the stream and every SVID issued for
        it is revoked. `missing_ok`: no error if it had already ended."""
        info = self.agent._end(self.task_id, missing_ok)
        self.ended = True
        return info

    def __repr__(self) -> str:
        return f"Task({self.task_id!r}, {self.spiffe_id!r})"


def _need_httpx() -> None:
    try:
        import httpx2  # noqa: F401
    except ImportError:
        raise SigilError("httpx2 is not installed: pip install 'sigil-agent[httpx]'") from None


class TaskScope:
    """What `Agent.task()` returns: a sync and async context manager."""

    def __init__(self, agent: Agent, task_id: str, ttl: timedelta | float | None, attributes: Mapping[str, str]) -> None:
        self._agent = agent
        self._args = (task_id, ttl, attributes)
        self._task: Task | None = None

    def __enter__(self) -> Task:
        task_id, ttl, attributes = self._args
        self._task = self._agent.begin(task_id, ttl=ttl, attributes=attributes)
        return self._task

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._finish(failing=kind is not None)

    def _finish(self, failing: bool) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            task.end(missing_ok=True)
        except SigilError as err:
            if not failing:
                raise
            # Do not hide the exception the block raised.
            _log.warning("sigil_agent: ending task %s after an error failed: %s", task.task_id, err)

    async def __aenter__(self) -> Task:
        import anyio

        task_id, ttl, attributes = self._args
        holder: list[Task] = []

        def begin() -> None:
            holder.append(self._agent.begin(task_id, ttl=ttl, attributes=attributes))

        try:
            # Not abandoned on cancellation: a Begin in flight is waited for,
            # so that its task can be ended.
            await anyio.to_thread.run_sync(begin, abandon_on_cancel=False)
        except BaseException:
            # Cancelled while Begin ran: __aexit__ will not run, end it here.
            if holder:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: holder[0].end(missing_ok=True))
            raise
        self._task = holder[0]
        return holder[0]

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        import anyio

        # Shielded: a cancelled block still ends its task.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._finish, kind is not None)
