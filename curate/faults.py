"""Failpoints: a test hook that crashes a chosen step once, the way a dead process does in
production (no exception, no cleanup, no `finally`). Not a user setting; off unless the
environment variable is set, and then `fire()` costs a dict lookup.

    CURATE_FAILPOINT=<name>:<once-file>[,<name>:<once-file>...]

When the code reaches `fire(name)` and `<name>` is set, the first process to create
`<once-file>` (O_CREAT | O_EXCL, so exactly one wins across processes and nodes sharing the
path) calls `os._exit(FAILPOINT_EXIT_CODE)`. Every later arrival, including the restarted actor
or the retried task that redoes the work, finds the file and goes on. The test then checks that
Ray redid the work and that the outputs are exactly once.

Names (where they fire):
  score_first_batch   ShardScorer.score_window, after the model scored the window's rows and
                      before anything of that window is written
  score_after_write   ShardScorer.score_window, after the window's scores are written and
                      before the call returns (a retry must find the window scored, not redo it)
  score_poison        ShardScorer.score_window, EVERY time a window of the shard named instead of
                      a once-file is scored (`score_poison:part-00003`): a shard that kills its
                      actor on every try (a poison input)
  rank_counts         distributed_selection.shard_score_counts, a shard's counts for one pass of
                      the top-fraction ranking computed and not yet returned (the task is redone)
  decide_shuffle      block_shuffle.map_round, a block's rows for one dedup round split into
                      partitions and not yet returned (the task is redone from its inputs)
  ray_start_timeout   ray_adapter.connect(), a local start: the first attempt to arrive runs
                      with Ray's start-up waits at 0 s, so Ray's own start-up times out for
                      real (`armed()`, not a crash); the retry runs with ray.init_timeout_s

Kill points (any name starting with selection., publish., run. or export.; tests/test_data_safety.py):
the process SIGKILLs itself there, as `kill -9` would, once per once-file. They sit at every step
of writing and publishing a selection (curate/selection.py, curate/publish.py), before the
run's selection phase (curate/runner.py), and in `curate export` (curate/export.py:
export.before_marker in a shard task, its files written and its marker not; export.shard_done
in the driver, a shard's result collected).

CURATE_PAUSE=<name>=<seconds>[,...] sleeps at `fire(name)` instead: the concurrency tests hold a
run's lock open with it.

The driver forwards the variable to its Ray workers (`forwarded_env()`, used by
curate/ray_adapter.py), so it works the same with a local Ray and with `--address`.
"""

from __future__ import annotations

import json
import os
import time
import signal

ENV = "CURATE_FAILPOINT"
FAILPOINT_EXIT_CODE = 75
NAMES = ("score_first_batch", "score_after_write", "score_poison", "ray_start_timeout", "rank_counts", "decide_shuffle")
# kill points: the process SIGKILLs itself there (once per once-file), as `kill -9` would; used by
# the publish/selection kill tests (tests/test_data_safety.py) and the export resume test
# (tests/test_export.py). Any name with these prefixes.
KILL_PREFIXES = ("selection.", "publish.", "run.", "export.")
ALWAYS = ("score_poison",)  # their argument is the shard to crash on, every time


def _parse(value: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        name, sep, once = item.partition(":")
        if not sep or not once or (name not in NAMES and not name.startswith(KILL_PREFIXES)):
            raise ValueError(f"{ENV}={value!r}: expected <name>:<once-file> with name in {NAMES}, got {item!r}")
        points[name] = once
    return points


PAUSE_ENV = "CURATE_PAUSE"  # "<name>=<seconds>[,...]": sleep there (concurrency tests hold a lock open)


def fire(name: str, detail: str = "") -> None:
    """Crash this process here, once per once-file, if the failpoint `name` is set. The once-file
    records the name, `detail` (e.g. the shard) and the pid of the process that died. With
    CURATE_PAUSE naming `name`, sleep there first."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        for item in pause.split(","):
            key, _, seconds = item.partition("=")
            if key.strip() == name:
                time.sleep(float(seconds))
    value = os.environ.get(ENV)
    if not value:
        return
    once = _parse(value).get(name)
    if once is None:
        return
    if name in ALWAYS:
        if detail == once:
            os._exit(FAILPOINT_EXIT_CODE)
        return
    try:
        fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # fired already: this is the redo
    os.write(fd, json.dumps({"failpoint": name, "detail": detail, "pid": os.getpid()}).encode())
    os.close(fd)
    if name.startswith(KILL_PREFIXES):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(FAILPOINT_EXIT_CODE)


def armed(name: str, detail: str = "") -> bool:
    """True once per once-file if the failpoint `name` is set, like `fire()` but without the
    crash: for a step whose caller makes it fail in its own, real way (`ray_start_timeout`)."""
    value = os.environ.get(ENV)
    if not value:
        return False
    once = _parse(value).get(name)
    if once is None:
        return False
    try:
        fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, json.dumps({"failpoint": name, "detail": detail, "pid": os.getpid()}).encode())
    os.close(fd)
    return True


def forwarded_env() -> dict[str, str]:
    """The failpoint variable, validated, for the Ray job's workers ({} when unset)."""
    value = os.environ.get(ENV)
    if not value:
        return {}
    _parse(value)
    return {ENV: value}
