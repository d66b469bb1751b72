"""The MCP server the example agent calls: one tool, `whoami`, that answers
with the identity `sigil gate` vouched for (the `x-sigil-*` headers the gate
sets after it verified the caller's SVID). Plain HTTP on 127.0.0.1: the gate
in front of it terminates mTLS.

    python mcp_tools_server.py 8080      # then: sigil gate --upstream http://127.0.0.1:8080 ...

With port 0 it picks a free port and prints `listening on 127.0.0.1:PORT`.
"""

from __future__ import annotations

import json
import socket
import sys

import anyio
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("sigil-example-tools")


@server.tool()
def whoami(job: str, ctx: Context) -> str:
    """Who called, as the gate verified it."""
    headers = ctx.headers or {}
    return json.dumps(
        {
            "job": job,
            "spiffe_id": headers.get("x-sigil-spiffe-id"),
            "instance": headers.get("x-sigil-instance"),
            "task": headers.get("x-sigil-task"),
        }
    )


async def main(port: int) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    uv = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), log_level="warning"))

    async def announce() -> None:
        while not uv.started:
            await anyio.sleep(0.02)
        print("listening on %s:%d" % sock.getsockname(), flush=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(announce)
        await uv.serve(sockets=[sock])


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
