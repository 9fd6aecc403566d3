"""Names that become path components: one rule, checked wherever a user-given name turns into a
folder or file name (a selection's folder; `curate select --name`, `report --selection`, a spec's
selection.name). No heavy imports: the config module uses it."""

from __future__ import annotations

import re

# A name that becomes one path component (a selection's folder, a shard's file stem): letters,
# digits, '_', '-', '.', not starting with '.' (so never '.', '..' or a hidden staging folder of
# curate's own, curate/publish.py) or '-' (never an option), at most 128 characters.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def is_name(name: object) -> bool:
    """Whether `name` passes check_name (listing folders: curate's hidden staging folders do not)."""
    return isinstance(name, str) and _NAME.match(name) is not None


def check_name(name: object, what: str) -> str:
    """`name` if it is safe as one path component, else a ValueError naming `what` (e.g.
    "selection name"). Every place where a user-given name becomes a path calls this."""
    if not is_name(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', not starting "
            "with '.' or '-' (it becomes a folder name, so '.', '..', '' and path separators are refused)"
        )
    return name
