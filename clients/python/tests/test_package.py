"""The package itself: its shipped stubs match the proto, it type-checks,
and the SPIFFE ID patterns follow Sigil's rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sigil_agent import IdPattern

PACKAGE = Path(__file__).resolve().parents[1]


def test_shipped_stubs_match_the_proto() -> None:
    done = subprocess.run(
        [sys.executable, str(PACKAGE / "scripts" / "gen_stubs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_the_package_type_checks_strictly() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"], cwd=PACKAGE, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "allowed"),
    [
        ("spiffe://td/agent/bot/instance/1", "spiffe://td/agent/bot/instance/1", True),
        ("spiffe://td/agent/bot", "spiffe://td/agent/bot/instance/1", False),
        ("spiffe://td", "spiffe://td/agent/bot/instance/1", True),
        ("spiffe://td/**", "spiffe://td/agent/bot/instance/1", True),
        ("spiffe://td/agent/*/instance/*", "spiffe://td/agent/bot/instance/1", True),
        ("spiffe://td/agent/*/instance/*", "spiffe://td/agent/bot/instance/1/task/t", False),
        ("spiffe://td/agent/bot/**", "spiffe://td/agent/bot", True),
        ("spiffe://td/agent/bot/**", "spiffe://td/agent/botnet/x", False),
        ("spiffe://td", "spiffe://td.evil/agent/bot", False),
        ("spiffe://td", "spiffe://other/agent/bot", False),
        ("spiffe://td/*", "spiffe://td", False),
        ("spiffe://td", "https://td/agent", False),
    ],
)
def test_patterns(pattern: str, spiffe_id: str, allowed: bool) -> None:
    assert IdPattern.parse(pattern).matches(spiffe_id) is allowed


@pytest.mark.parametrize(
    "bad", ["td/agent", "spiffe://", "spiffe://TD/x", "spiffe://td/**/x", "spiffe://td/a//b", "spiffe://td/../x", "spiffe://td/a b", "spiffe://td/"]
)
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a SPIFFE ID pattern"):
        IdPattern.parse(bad)
