"""SPIFFE ID patterns: which peers a context accepts.

The same rule as Sigil's own (`sigil gate --allow`, `sigil verify --allow`):
a pattern is `spiffe://<trust domain>` then path segments, where `*` matches
exactly one segment and a final `**` any number (zero or more) of the rest.
`spiffe://td` alone allows every ID of the trust domain; a pattern without
wildcards allows exactly that ID. `**` anywhere but last is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class IdPattern:
    """A parsed pattern; `IdPattern.parse("spiffe://td/agent/*/**")`."""

    text: str
    trust_domain: str
    segments: tuple[str | None, ...]  # None is `*`
    rest: bool

    @classmethod
    def parse(cls, text: str) -> IdPattern:
        def bad(why: str) -> ValueError:
            return ValueError(f"{text!r} is not a SPIFFE ID pattern: {why}")

        if not text.startswith("spiffe://"):
            raise bad("it must start with spiffe://")
        td, _, path = text[len("spiffe://") :].partition("/")
        if not _TRUST_DOMAIN.fullmatch(td):
            raise bad("the trust domain must be lower-case letters, digits, '-', '.', '_'")
        if not path and not text.endswith("/"):
            return cls(text, td, (), True)
        parts = path.split("/")
        segments: list[str | None] = []
        rest = False
        for i, part in enumerate(parts):
            if part == "**":
                if i + 1 != len(parts):
                    raise bad("'**' may only be the last segment")
                rest = True
            elif part == "*":
                segments.append(None)
            elif part in ("", ".", ".."):
                raise bad("empty, '.' and '..' segments are not allowed")
            elif _SEGMENT.fullmatch(part):
                segments.append(part)
            else:
                raise bad("segments hold letters, digits, '-', '.', '_', or are '*' / '**'")
        return cls(text, td, tuple(segments), rest)

    def matches(self, spiffe_id: str) -> bool:
        """Whether `spiffe_id` (a SPIFFE ID as text) is allowed."""
        if not spiffe_id.startswith("spiffe://"):
            return False
        td, _, path = spiffe_id[len("spiffe://") :].partition("/")
        if td != self.trust_domain:
            return False
        parts = [p for p in path.split("/") if p]
        if len(parts) < len(self.segments):
            return False
        if not self.rest and len(parts) != len(self.segments):
            return False
        return all(s is None or s == p for s, p in zip(self.segments, parts))

    def __str__(self) -> str:
        return self.text
