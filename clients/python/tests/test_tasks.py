"""Task lifecycle through a real daemon: Begin, the task SVID on the stream,
End on normal exit, on an exception and on Ctrl-C, refusals as
`TaskRefused`, and the async variant."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from conftest import TRUST_DOMAIN, Daemon, entries, wait_until

from sigil_agent import (
    Agent,
    DaemonUnavailable,
    NotAttested,
    TaskEnded,
    TaskRefused,
)


def svid_ids(agent: Agent) -> set[str]:
    return {str(s.spiffe_id) for s in agent.x509_context().x509_svids}


def test_agent_reads_the_socket_from_the_environment(daemon: Daemon) -> None:
    with Agent() as agent:
        assert agent.spiffe_id.startswith(f"spiffe://{TRUST_DOMAIN}/agent/agent/instance/")
        assert agent.svid.leaf.serial_number > 0
        assert agent.tasks() == []


def test_task_lifecycle_svid_appears_and_end_on_exit_revokes_it(daemon: Daemon) -> None:
    with Agent() as agent:
        with agent.task("summarize-42", ttl=timedelta(minutes=2), attributes={"job": "42"}) as task:
            assert task.spiffe_id == f"{agent.spiffe_id}/task/summarize-42"
            # Begin returned only once the SVID was on this process's stream.
            assert task.spiffe_id in svid_ids(agent)
            assert str(task.svid.spiffe_id) == task.spiffe_id
            serial = task.svid.leaf.serial_number
            (listed,) = agent.tasks()
            assert listed.task_id == "summarize-42"
            assert listed.attributes == {"job": "42"}
            assert timedelta(seconds=100) < listed.expires_at - listed.started_at <= timedelta(minutes=2)
        assert agent.tasks() == []
        assert wait_until(lambda: task.spiffe_id not in svid_ids(agent), 5)
        assert wait_until(lambda: serial in daemon.crl_serials(), 2)
        with pytest.raises(TaskEnded):
            task.svid


def test_end_on_exception(daemon: Daemon) -> None:
    with Agent() as agent:
        with pytest.raises(RuntimeError, match="the job failed"):
            with agent.task("failing-job"):
                assert len(agent.tasks()) == 1
                raise RuntimeError("the job failed")
        assert agent.tasks() == []


def test_end_on_ctrl_c(daemon: Daemon) -> None:
    with Agent() as agent:
        with pytest.raises(KeyboardInterrupt):
            with agent.task("interrupted") as task:
                assert agent.tasks()[0].task_id == "interrupted"
                # A real SIGINT, as Ctrl-C sends: Python raises KeyboardInterrupt.
                signal.raise_signal(signal.SIGINT)
        assert agent.tasks() == []
        assert task.ended


def test_refusals_carry_the_daemons_reason(daemon: Daemon) -> None:
    with Agent() as agent:
        with pytest.raises(TaskRefused) as refused:
            with agent.task("too-long", ttl=timedelta(hours=2)):
                pytest.fail("the block must not run")
        assert refused.value.code == "INVALID_ARGUMENT" or refused.value.code is not None
        assert "10m" in refused.value.reason, refused.value.reason
        with pytest.raises(TaskRefused) as refused:
            agent.begin("../escape")
        assert "task" in refused.value.reason
        with pytest.raises(TaskRefused):
            with agent.task("twin"):
                agent.begin("twin")
        assert agent.tasks() == []


def test_self_declared_tasks_off_is_refused(daemon_factory: object, monkeypatch: pytest.MonkeyPatch) -> None:
    d: Daemon = daemon_factory(entries(agent_tasks="self_declare = false"))  # type: ignore[operator]
    with Agent(d.endpoint) as agent:
        with pytest.raises(TaskRefused) as refused:
            agent.begin("not-mine")
        assert "self_declare" in refused.value.reason, refused.value.reason


def test_async_task_lifecycle_and_cancellation(daemon: Daemon) -> None:
    async def main() -> None:
        with Agent() as agent:
            async with agent.task("async-job", ttl=120) as task:
                assert task.spiffe_id in svid_ids(agent)
                await anyio.sleep(0)
            assert agent.tasks() == []
            # A cancelled block still ends its task.
            with anyio.move_on_after(0.5):
                async with agent.task("cancelled-job"):
                    assert len(agent.tasks()) == 1
                    await anyio.sleep(30)
            assert agent.tasks() == []

    anyio.run(main)


def test_not_attested_and_unreachable_say_why(daemon_factory: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A daemon with no entry for this process.
    d: Daemon = daemon_factory('[[entry]]\nname = "someone-else"\nselectors = ["unix:uid:4242"]\n')  # type: ignore[operator]
    with pytest.raises(NotAttested) as refused:
        Agent(d.endpoint, timeout=5)
    assert refused.value.code == "PERMISSION_DENIED"
    assert refused.value.reason
    with pytest.raises(DaemonUnavailable, match="no socket at"):
        Agent(f"unix://{tmp_path}/missing.sock")
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(DaemonUnavailable, match="not a socket"):
        Agent(f"unix://{regular}")
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(DaemonUnavailable, match="SPIFFE_ENDPOINT_SOCKET is not set"):
        Agent()
    assert os.path.exists(d.socket)
