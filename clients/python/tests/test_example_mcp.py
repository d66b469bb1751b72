"""The README's example end to end: examples/mcp_agent.py (its own process,
attested as entry `agent`) runs two jobs, each as a task, calling the
`whoami` tool of examples/mcp_tools_server.py through a real `sigil gate`
(attested as entry `gate`) that lets only task SVIDs call tools. Checked:
each tool result names the identity the server saw, which is the job's
task; and a caller without a task is refused by the gate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TRUST_DOMAIN, Daemon, sigil_bin

from sigil_agent import Agent

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RULES = f"""
[[rule]]
mcp_method = "tools/call"
mcp_tool = "whoami"
allow = ["spiffe://{TRUST_DOMAIN}/agent/agent/instance/*/task/*"]
[[rule]]
path = "/mcp"
allow = ["spiffe://{TRUST_DOMAIN}/agent/agent/instance/*/task/*"]
"""
GATE_ID = f"spiffe://{TRUST_DOMAIN}/agent/gate/**"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gate(daemon: Daemon) -> Iterator[str]:
    """The tools server behind a real gate; yields the gate's MCP URL."""
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "mcp_tools_server.py"), "0"],
        stdout=subprocess.PIPE,
        stderr=open(daemon.dir / "tools.log", "wb"),
        text=True,
    )
    rules = daemon.dir / "rules.toml"
    rules.write_text(RULES)
    port = free_port()
    gate_log = open(daemon.dir / "gate.log", "wb")
    gate = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), line + (daemon.dir / "tools.log").read_text()
        upstream = line.split()[-1]
        gate = subprocess.Popen(
            [
                sigil_bin(), "gate", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://{upstream}",
                "--rules", str(rules), "--socket", daemon.endpoint,
            ],
            stdout=gate_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert gate.poll() is None, (daemon.dir / "gate.log").read_text()
                assert time.monotonic() < deadline, "the gate did not listen within 20 s"
                time.sleep(0.05)
        yield f"https://127.0.0.1:{port}/mcp"
    finally:
        for p in (gate, server):
            if p is not None:
                p.terminate()
                p.wait(10)


def test_the_mcp_example_calls_tools_as_each_jobs_task(daemon: Daemon, gate: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mcp_agent.py"), gate, GATE_ID, "job-1", "job-2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": daemon.endpoint},
    )
    assert done.returncode == 0, done.stdout + done.stderr + (daemon.dir / "gate.log").read_text()
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["job"] for r in results] == ["job-1", "job-2"]
    instances = set()
    for r in results:
        seen = r["result"]
        assert seen["job"] == r["job"]
        assert seen["task"] == r["job"], seen
        assert seen["spiffe_id"].startswith(f"spiffe://{TRUST_DOMAIN}/agent/agent/instance/"), seen
        assert seen["spiffe_id"].endswith(f"/task/{r['job']}"), seen
        instances.add(seen["instance"])
    assert len(instances) == 1, "both jobs ran in one agent instance"


def test_the_gate_refuses_a_caller_without_a_task(daemon: Daemon, gate: str) -> None:
    import httpx2

    with Agent() as agent, httpx2.Client(verify=agent.ssl_context(GATE_ID)) as http:
        with pytest.raises(httpx2.TransportError):
            http.post(gate, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
