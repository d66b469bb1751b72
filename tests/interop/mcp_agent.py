"""An MCP agent process for tests/gate_mcp.rs, with its own SVIDs from Sigil.

Usage: mcp_agent.py --socket unix:///…/workload.sock --gate 127.0.0.1:PORT
                    --proto-dir DIR --gate-id-prefix spiffe://…/ [--tmp DIR]

The agent fetches its X.509-SVIDs itself with py-spiffe (`spiffe` on PyPI),
begins and ends its tasks with Sigil's task extension (gRPC stubs generated
at start from DIR/sigil/workload/v1/tasks.proto with grpcio-tools), writes
the SVID it uses and its key to a private temporary directory (0700, files
0600; under --tmp if given) so `ssl` can load them, and calls MCP tools through `sigil gate` with
the MCP SDK's client (streamable HTTP over httpx2, the SVID as client
certificate).

The gate's certificate is an X.509-SVID: its identity is a SPIFFE ID in a
URI SAN and it has no DNS SAN, so OpenSSL's hostname check cannot apply. The
agent turns hostname checking off, verifies the chain against the Sigil
bundle of its trust domain, and checks the gate's SPIFFE ID by hand (it must
start with --gate-id-prefix) on every connection it uses.

It obeys one JSON command a line on stdin and answers each with one JSON
line on stdout (`{"event": ...}`; `{"event": "error", ...}` when a command
raised):

  {"cmd": "fetch"}                            its SVIDs (instance, tasks)
  {"cmd": "fetch_from", "socket": S, "as": NAME}   another Sigil's SVID
  {"cmd": "begin", "task": T, "ttl": SECS}    Begin; waits for the task SVID
  {"cmd": "call", "as": NAME, "tool": TOOL, "mode": "auto"|"legacy",
   "headers": {...}}                          one tools/call with the SDK client
  {"cmd": "handshake", "as": NAME}            a new TLS connection: refused?
  {"cmd": "open", "as": NAME}                 keep an HTTPS connection open
  {"cmd": "raw_call", "as": NAME, "tool": TOOL, "headers": {...}}
                                              tools/call by hand, extra headers
  {"cmd": "end", "task": T}                   End
  {"cmd": "wait_closed", "timeout": SECS}     when the kept connection closed
  {"cmd": "exit"}

NAME is an identity the agent holds: "instance", "task" (the last begun
task's SVID) or one kept by fetch_from.
"""

import argparse
import http.client
import importlib.resources
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback

import anyio
import grpc
import httpx2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import duration_pb2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from spiffe import WorkloadApiClient

HEADER = [("workload.spiffe.io", "true")]


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        host, port = args.gate.rsplit(":", 1)
        self.gate = (host, int(port))
        self.url = f"https://{args.gate}/mcp"
        # Private: keys are written here. mkdtemp makes it 0700.
        self.dir = tempfile.mkdtemp(prefix="mcp-agent-", dir=args.tmp)
        self.identities: dict[str, dict] = {}
        self.bundle: str | None = None
        self.pb = None
        self.tasks = self._tasks_stub(args.socket, args.proto_dir)
        self.kept: dict | None = None
        self.ended_at: float | None = None

    # --- Sigil: SVIDs and tasks -------------------------------------------------------

    def _tasks_stub(self, endpoint: str, proto_dir: str):
        """Generates the Python stubs of tasks.proto and opens a channel."""
        from grpc_tools import protoc

        out = os.path.join(self.dir, "stubs")
        os.mkdir(out)
        includes = str(importlib.resources.files("grpc_tools") / "_proto")
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_dir}",
                f"-I{includes}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                "sigil/workload/v1/tasks.proto",
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on tasks.proto ({code})")
        sys.path.insert(0, out)
        from sigil.workload.v1 import tasks_pb2, tasks_pb2_grpc

        self.pb = tasks_pb2
        channel = grpc.insecure_channel(endpoint)
        return tasks_pb2_grpc.TasksStub(channel)

    def _write_private(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        if os.path.exists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def _keep(self, name: str, svid) -> dict:
        """Writes an SVID's chain and key (PEM) and remembers them as `name`."""
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain
        )
        key = svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ident = {
            "spiffe_id": str(svid.spiffe_id),
            "serial": format(svid.leaf.serial_number, "x"),
            "cert": self._write_private(f"{name}.crt.pem", chain),
            "key": self._write_private(f"{name}.key.pem", key),
        }
        self.identities[name] = ident
        return ident

    def fetch(self, endpoint: str) -> list:
        client = WorkloadApiClient(socket_path=endpoint, default_timeout=10)
        try:
            return client.fetch_x509_context()
        finally:
            client.close()

    def cmd_fetch(self, _cmd: dict) -> dict:
        context = self.fetch(self.args.socket)
        svids = context.x509_svids
        instance = next(s for s in svids if "/task/" not in str(s.spiffe_id))
        # The bundle of its own trust domain: what the gate's SVID must chain to.
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
            instance.spiffe_id.trust_domain
        )
        pem = b"".join(
            a.public_bytes(serialization.Encoding.PEM) for a in bundle.x509_authorities
        )
        self.bundle = self._write_private("bundle.pem", pem)
        ident = self._keep("instance", instance)
        return {
            "event": "svids",
            "instance": ident["spiffe_id"],
            "all": [str(s.spiffe_id) for s in svids],
        }

    def cmd_fetch_from(self, cmd: dict) -> dict:
        """The default SVID of another Sigil (another trust domain, or a
        stranger's CA), kept as `as`."""
        context = self.fetch(cmd["socket"])
        ident = self._keep(cmd["as"], context.default_svid)
        return {"event": "svids", "spiffe_id": ident["spiffe_id"]}

    def cmd_begin(self, cmd: dict) -> dict:
        task = cmd["task"]
        request = self.pb.BeginRequest(
            task_id=task, ttl=duration_pb2.Duration(seconds=int(cmd.get("ttl", 300)))
        )
        begun = self.tasks.Begin(request, metadata=HEADER, timeout=10)
        deadline = time.monotonic() + 10
        while True:
            context = self.fetch(self.args.socket)
            found = [
                s for s in context.x509_svids if str(s.spiffe_id).endswith(f"/task/{task}")
            ]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not found:
            raise RuntimeError(f"no SVID for task {task} on the stream")
        ident = self._keep("task", found[0])
        return {
            "event": "begun",
            "task_id": begun.task.task_id,
            "task_spiffe_id": begun.task.spiffe_id,
            "spiffe_id": ident["spiffe_id"],
            "serial": ident["serial"],
        }

    def cmd_end(self, cmd: dict) -> dict:
        started = time.monotonic()
        self.tasks.End(
            self.pb.EndRequest(task_id=cmd["task"]), metadata=HEADER, timeout=10
        )
        self.ended_at = time.monotonic()
        return {"event": "ended", "rpc_ms": (self.ended_at - started) * 1000}

    # --- TLS to the gate -----------------------------------------------------------------

    def tls(self, name: str) -> ssl.SSLContext:
        ident = self.identities[name]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # No hostname check (the gate's SVID has no DNS SAN); the chain is
        # still verified against the bundle and the SPIFFE ID by check_gate.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=self.bundle)
        ctx.load_cert_chain(ident["cert"], ident["key"])
        return ctx

    def check_gate(self, ssl_object) -> str:
        """The gate's SPIFFE ID, which must start with --gate-id-prefix."""
        der = ssl_object.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or not uris[0].startswith(self.args.gate_id_prefix):
            raise ssl.SSLError(f"the server is not the gate: URI SANs {uris}")
        return uris[0]

    # --- MCP through the gate --------------------------------------------------------------

    def cmd_call(self, cmd: dict) -> dict:
        return anyio.run(self._call, cmd)

    async def _call(self, cmd: dict) -> dict:
        """One tools/call with the SDK's client, recording each HTTP exchange."""
        exchanges = []
        gate_ids = set()

        async def on_response(response: httpx2.Response) -> None:
            stream = response.extensions.get("network_stream")
            gate_ids.add(self.check_gate(stream.get_extra_info("ssl_object")))
            rpc = tool = None
            try:
                body = json.loads(response.request.content or b"null")
                if isinstance(body, dict):
                    rpc = body.get("method")
                    tool = (body.get("params") or {}).get("name")
            except ValueError:
                pass
            exchanges.append(
                {
                    "http": response.request.method,
                    "rpc": rpc,
                    "tool": tool,
                    "mcp_method_header": response.request.headers.get("mcp-method"),
                    "status": response.status_code,
                }
            )

        http = httpx2.AsyncClient(
            verify=self.tls(cmd["as"]),
            headers=cmd.get("headers") or {},
            trust_env=False,
            timeout=httpx2.Timeout(20.0),
            event_hooks={"response": [on_response]},
        )
        result = {"event": "called", "tool": cmd["tool"], "mode": cmd.get("mode", "auto")}
        try:
            with anyio.fail_after(30):
                async with http:
                    transport = streamable_http_client(self.url, http_client=http)
                    async with Client(transport, mode=cmd.get("mode", "auto")) as client:
                        answer = await client.call_tool(cmd["tool"], cmd.get("args") or {})
            text = "".join(getattr(c, "text", "") for c in answer.content)
            result.update(ok=not answer.is_error, text=text)
        except Exception as e:
            # The SDK raises from task groups: name the innermost error.
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
        result.update(exchanges=exchanges, gate_ids=sorted(gate_ids))
        return result

    def cmd_handshake(self, cmd: dict) -> dict:
        """A new connection as `as`, and one MCP request on it: is it refused?

        With TLS 1.3 the client's side of the handshake ends before the
        server has checked the client's certificate: the gate's refusal
        arrives as an alert on the first read, before any HTTP answer.
        """
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
        request = (
            b"POST /mcp HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        ctx = self.tls(cmd["as"])
        try:
            with socket.create_connection(self.gate, timeout=10) as raw:
                with ctx.wrap_socket(raw) as tls:
                    gate_id = self.check_gate(tls)
                    tls.sendall(request)
                    data = tls.recv(4096)
        except (ssl.SSLError, OSError) as e:
            return {"event": "handshake", "refused": True, "error": f"{type(e).__name__}: {e}"}
        if not data:
            return {"event": "handshake", "refused": True, "error": "closed before any answer"}
        status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        return {"event": "handshake", "refused": False, "status_line": status_line, "gate_id": gate_id}

    def legacy_session(self, name: str):
        """An HTTPS keep-alive connection to the gate as `name` with an MCP
        session initialized on it (protocol 2025-11-25, by hand with
        http.client); returns the connection and a function posting one
        JSON-RPC message (with extra headers) and returning (status, messages)."""
        conn = http.client.HTTPSConnection(
            self.gate[0], self.gate[1], context=self.tls(name), timeout=10
        )
        session = {}

        def post(message: dict, extra: dict | None = None) -> tuple[int, list]:
            headers = {
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            }
            if session:
                headers["Mcp-Session-Id"] = session["id"]
                headers["Mcp-Protocol-Version"] = session["version"]
            headers.update(extra or {})
            conn.request("POST", "/mcp", body=json.dumps(message), headers=headers)
            response = conn.getresponse()
            data = response.read().decode()
            if response.getheader("Content-Type", "").startswith("text/event-stream"):
                messages = [
                    json.loads(line[5:]) for line in data.splitlines() if line.startswith("data:")
                ]
            elif data.strip():
                messages = [json.loads(data) if data.lstrip().startswith("{") else data]
            else:
                messages = []
            if response.getheader("Mcp-Session-Id") and not session:
                session["id"] = response.getheader("Mcp-Session-Id")
                session["version"] = messages[0]["result"]["protocolVersion"]
            return response.status, messages

        status, _ = post(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "mcp_agent", "version": "0"},
                },
            }
        )
        if status != 200 or not session:
            raise RuntimeError(f"initialize answered {status}")
        post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.check_gate(conn.sock)
        return conn, post

    @staticmethod
    def tool_call(tool: str) -> dict:
        return {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {}},
        }

    def cmd_raw_call(self, cmd: dict) -> dict:
        """One tools/call in a hand-made session, with extra HTTP headers."""
        conn, post = self.legacy_session(cmd["as"])
        try:
            status, messages = post(self.tool_call(cmd["tool"]), cmd.get("headers"))
        finally:
            conn.close()
        return {"event": "raw_called", "status": status, "messages": messages}

    def cmd_open(self, cmd: dict) -> dict:
        """A keep-alive connection with an MCP session that calls
        echo_identity and then stays open; a thread notes when it closes."""
        conn, post = self.legacy_session(cmd["as"])
        status, called = post(self.tool_call("echo_identity"))
        seen = json.loads(called[0]["result"]["content"][0]["text"])
        gate_id = self.check_gate(conn.sock)
        sock = conn.sock
        sock.settimeout(None)
        kept = {"closed": threading.Event(), "at": None, "how": None, "conn": conn}

        def watch() -> None:
            try:
                data = sock.recv(1)
                kept["how"] = "eof" if not data else f"unexpected data {data!r}"
            except (ssl.SSLError, OSError) as e:
                kept["how"] = f"{type(e).__name__}: {e}"
            kept["at"] = time.monotonic()
            kept["closed"].set()

        threading.Thread(target=watch, daemon=True).start()
        self.kept = kept
        return {"event": "opened", "status": status, "seen": seen, "gate_id": gate_id}

    def cmd_wait_closed(self, cmd: dict) -> dict:
        kept = self.kept
        closed = kept["closed"].wait(float(cmd.get("timeout", 5)))
        result = {"event": "closed" if closed else "still_open", "how": kept["how"]}
        if closed and self.ended_at is not None:
            result["after_end_ms"] = (kept["at"] - self.ended_at) * 1000
        return result

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--gate", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--gate-id-prefix", required=True)
    parser.add_argument("--tmp")
    agent = Agent(parser.parse_args())
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["cmd"] == "exit":
                break
            try:
                answer = getattr(agent, "cmd_" + cmd["cmd"])(cmd)
            except Exception:
                answer = {"event": "error", "cmd": cmd["cmd"], "error": traceback.format_exc()}
            print(json.dumps(answer), flush=True)
    finally:
        agent.close()


if __name__ == "__main__":
    main()
