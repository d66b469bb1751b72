"""sigil-agent: an AI agent's identity from Sigil, in Python.

    from datetime import timedelta
    from sigil_agent import Agent

    agent = Agent()  # the socket from SPIFFE_ENDPOINT_SOCKET
    with agent.task("summarize-42", ttl=timedelta(minutes=5)) as task:
        with task.httpx_client("spiffe://example.org/gate/**") as http:
            http.get("https://tools.internal:8443/")

See the package README for the whole API.
"""

from .agent import Agent, Task, TaskInfo, TaskScope
from .errors import (
    DaemonUnavailable,
    NotAttested,
    PeerNotAllowed,
    SigilError,
    TaskEnded,
    TaskError,
    TaskRefused,
)
from .pattern import IdPattern
from .tls import SvidContext

__all__ = [
    "Agent",
    "DaemonUnavailable",
    "IdPattern",
    "NotAttested",
    "PeerNotAllowed",
    "SigilError",
    "SvidContext",
    "Task",
    "TaskEnded",
    "TaskError",
    "TaskInfo",
    "TaskRefused",
    "TaskScope",
]

__version__ = "0.1.0"
