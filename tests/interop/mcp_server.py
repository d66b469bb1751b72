"""A real MCP server (the `mcp` Python SDK, streamable HTTP) for tests/gate_mcp.rs.

Usage: mcp_server.py RECORD_FILE

Serves MCPServer's streamable HTTP app on 127.0.0.1 (a port of its own
choosing, printed as `listening on 127.0.0.1:PORT` once it accepts), in plain
HTTP: `sigil gate` in front of it terminates mTLS. It has two tools:

- `echo_identity` returns, as JSON text, the identity headers the request
  reached the server with (read through the SDK's `Context.headers`);
- `delete_everything`, the tool the gate's rules forbid the agent.

Every HTTP request the server receives (method, path and all headers) and
every tool that runs is appended to RECORD_FILE as one JSON line, so the test
can check what did and did not reach the upstream.
"""

import json
import socket
import sys
import threading

import anyio
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

IDENTITY_HEADERS = (
    "x-sigil-spiffe-id",
    "x-sigil-instance",
    "x-sigil-task",
    "x-forwarded-client-cert",
)

_record_lock = threading.Lock()


def record(path: str, event: dict) -> None:
    with _record_lock, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def build(record_file: str) -> MCPServer:
    server = MCPServer("sigil-gate-test")

    @server.tool()
    def echo_identity(ctx: Context) -> str:
        """Returns the identity headers this request reached the server with."""
        headers = ctx.headers or {}
        seen = {name: headers.get(name) for name in IDENTITY_HEADERS}
        record(record_file, {"tool_ran": "echo_identity", "seen": seen})
        return json.dumps(seen)

    @server.tool()
    def delete_everything() -> str:
        """The tool no agent task may call."""
        record(record_file, {"tool_ran": "delete_everything"})
        return "deleted everything"

    return server


class RecordRequests:
    """ASGI middleware: one JSON line per HTTP request, before the app sees it."""

    def __init__(self, app, record_file: str) -> None:
        self.app = app
        self.record_file = record_file

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
            ]
            record(
                self.record_file,
                {"method": scope["method"], "path": scope["path"], "headers": headers},
            )
        await self.app(scope, receive, send)


async def main() -> None:
    record_file = sys.argv[1]
    app = build(record_file).streamable_http_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        RecordRequests(app, record_file), log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            await anyio.sleep(0.02)
        print("listening on %s:%d" % sock.getsockname(), flush=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(announce)
        await server.serve(sockets=[sock])


if __name__ == "__main__":
    anyio.run(main)
