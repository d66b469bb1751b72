"""An AI agent that runs each job as a Sigil task and calls MCP tools
through `sigil gate` with the task's SVID.

    SPIFFE_ENDPOINT_SOCKET=unix:///run/sigil/workload.sock \
        python mcp_agent.py https://tools.internal:8443/mcp 'spiffe://example.org/agent/gate/**' job-1 job-2

For each job: Begin a task (its own X.509-SVID, spiffe://…/instance/<id>/task/<job>),
call the `whoami` tool with that SVID as client certificate, print the
result, End the task (also if the call fails or the agent is interrupted;
the gate then closes the task's connections and refuses its certificate).
The gate is verified too: its SVID must chain to Sigil's bundle, not be on
Sigil's CRL and match the pattern given.

Needs: pip install 'sigil-agent[httpx]' mcp
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import anyio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from sigil_agent import Agent


async def run_job(agent: Agent, url: str, gate_id: str, job: str) -> str:
    async with agent.task(job, ttl=timedelta(minutes=5), attributes={"job": job}) as task:
        async with task.async_httpx_client(gate_id) as http:
            async with Client(streamable_http_client(url, http_client=http)) as mcp:
                result = await mcp.call_tool("whoami", {"job": job})
        return "".join(getattr(part, "text", "") for part in result.content)


async def main(url: str, gate_id: str, jobs: list[str]) -> None:
    with Agent() as agent:
        for job in jobs:
            print(json.dumps({"job": job, "result": json.loads(await run_job(agent, url, gate_id, job))}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
