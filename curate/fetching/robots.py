"""X-Robots-Tag: does a response opt its image out of our use?

Behaviour (docs/FETCH.md has the table; tests/test_fetch_hostile.py tests each line):

- Every X-Robots-Tag header of the response counts (a response may carry several); names and
  values are case-insensitive.
- A header value is a list of directives separated by commas (or semicolons, which some servers
  use). A directive may be prefixed with a user-agent token, `otherbot: noai`; the token then
  applies to that directive and to the following ones *in the same header value*, until another
  token appears. Directives with no token apply to every crawler.
- A directive opts out when it is in `disallowed` (default noai, noimageai, noindex,
  noimageindex) and applies to us: no token, or our own token (`curate: noai`). `none` means
  noindex + nofollow. `otherbot: noai` does not apply to us.
- Directives whose value itself contains a colon are not mistaken for tokens:
  `unavailable_after: 25 Jun 2010 15:00:00 PST`, `max-image-preview: none`.
- Unknown directives are ignored; nothing in a malformed header raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_TOKEN = re.compile(r"^\s*([A-Za-z0-9_.*-]+)\s*:\s*(.*)$", re.S)
_ALIASES = {"none": ("noindex", "nofollow"), "all": ()}


def directives_for(values: Iterable[str], token: str) -> set[str]:
    """The directives (lower case) that apply to user agent `token` across all header values."""
    token = token.strip().lower()
    out: set[str] = set()
    for value in values:
        current: Optional[str] = None
        for item in re.split(r"[,;]", value or ""):
            item = item.strip()
            if not item:
                continue
            m = _TOKEN.match(item)
            if m and m.group(1).lower() not in _VALUED:
                current = m.group(1).lower()
                item = m.group(2).strip()
                if not item:
                    continue
                m2 = _TOKEN.match(item)
                if m2 and m2.group(1).lower() in _VALUED:
                    item = m2.group(1)
            elif m:
                item = m.group(1)
            if current is not None and current != token:
                continue
            name = item.lower()
            out.add(name)
            out.update(_ALIASES.get(name, ()))
    return out


def opt_out(values: Iterable[str], token: str, disallowed: Iterable[str]) -> Optional[str]:
    """The first disallowed directive that applies to `token`, or None."""
    hit = directives_for(values, token) & {d.strip().lower() for d in disallowed}
    return min(hit) if hit else None
