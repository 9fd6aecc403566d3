"""Imported at start-up by every Python process whose PYTHONPATH holds this folder
(bench_select_scale.py puts it there for the `curate select` it measures): with CURATE_BENCH_PEAK
set, the process writes its own peak resident memory (VmHWM, kB) to that file when it exits.

Why not the ru_maxrss that wait4 returns: a child's maxrss starts at its parent's high-water mark
(fork copies the parent's memory map and exec keeps the larger of the two), so a driver started by
a benchmark process that generated a pool reports the benchmark's memory, not its own. VmHWM
belongs to the process's own memory map, created at exec."""

import atexit
import os

_OUT = os.environ.get("CURATE_BENCH_PEAK")


def _write_peak() -> None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                with open(_OUT, "w") as out:
                    out.write(line.split()[1])


if _OUT:
    atexit.register(_write_peak)
