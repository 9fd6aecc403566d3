"""The executor a step uses when none is given: Ray (the Ray this process already has, or a new
local one). Kept apart from curate/executor.py, which must not know its Ray implementation."""

from __future__ import annotations

from curate.executor import Executor


def given_or_ray(given: Executor | None = None) -> Executor:
    """The executor given, or Ray: the Ray this process already has, or a new local one (a
    selection may run outside `curate run`)."""
    if given is not None:
        return given
    # lazy: ray (~0.4 s), only for the Ray selection engine without an executor given
    from curate.ray_adapter import RayExecutor

    return RayExecutor()
