"""What a run directory may hold, and which of it is curate's: the checks before a run writes into
a folder, and `--overwrite`, which removes only files curate wrote.

curate writes, and so may remove:
    manifest.json
    annotations/<shard>.parquet, annotations/<shard>.done
    images/<shard>.parquet, embeddings/<shard>.parquet
    _work/<shard>/<file>    the files of a shard in flight (store.work_owned)
    selections/<name>/...   the files of a selection (store.selection_owned), its staging and
                            parked copies, its bucket versions (curate/publish.py)
    *.tmp-<hex>             a temporary file of an atomic write that a kill left behind
It never removes forget/ (deletion requests outlive every run) nor .curate.lock (curate/run_lock.py).
Anything else is a file a person put there: it stays, and the command says so.
"""

from __future__ import annotations

import json
import re
from typing import Any

from curate import io, publish, store
from curate.names import is_name
import os

SHARD_DIRS = store.SHARD_DIRS
_SHARD_FILE = re.compile(r"^[^/]+\.(parquet|done)$")
_TMP = re.compile(r"\.tmp-[0-9a-f]{32}$")
KEEP = (store.FORGET, store.LOCK)  # never removed


class NotARunDir(ValueError):
    """A folder that is not a curate run directory, where one was expected."""


def read_manifest(run_dir: str) -> dict[str, Any] | None:
    """The run's manifest, None when there is none; NotARunDir (naming the file) when it is not
    readable JSON or not a curate manifest."""
    p = store.manifest_path(run_dir)
    if not io.exists(p):
        return None
    try:
        m = io.read_json(p)
    except (ValueError, UnicodeDecodeError) as e:
        raise NotARunDir(
            f"{p} is not valid JSON ({e}); it is not a manifest curate can read. Move it away or "
            "choose another output folder (curate deletes nothing it cannot identify)"
        ) from None
    if not isinstance(m, dict) or m.get("format") != 1 or not isinstance(m.get("spec"), dict):
        raise NotARunDir(
            f"{p} is not a curate manifest (no format 1 and spec); {run_dir} is not a curate run "
            "directory. Choose another output folder"
        )
    return m


def check_output_dir(run_dir: str) -> dict[str, Any] | None:
    """Before a run writes into `run_dir`: it must be a folder (or not exist yet), and if it
    holds anything besides curate's own lock and deletion keys it must be a curate run. Returns
    the previous run's manifest (None for a new or empty folder)."""
    fs, p = io.fs_and_path(run_dir)
    if fs.exists(p) and not fs.isdir(p):
        raise NotARunDir(f"--out {run_dir} is a file, not a folder")
    previous = read_manifest(run_dir)
    if previous is None and fs.exists(p):
        others = [x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(p, detail=False)]
        others = [x for x in others if x not in KEEP]
        if others:
            raise NotARunDir(
                f"--out {run_dir} is not empty ({', '.join(sorted(others)[:5])}{', ...' if len(others) > 5 else ''}) "
                "and is not a curate run directory (no manifest.json); choose a new or empty folder"
            )
    return previous


def remove_outputs(run_dir: str) -> list[str]:
    """`--overwrite`: remove every file curate wrote in `run_dir` (see the module docstring),
    completion markers first so that a kill part-way leaves shards that are simply not done.
    Returns the files left because curate did not write them (relative paths)."""
    fs, top = io.fs_and_path(run_dir)
    top = top.rstrip("/")
    if not fs.exists(top):
        return []
    left: list[str] = []
    doomed: list[str] = []
    for p in sorted(fs.find(top)):
        rel = p[len(top) + 1 :]
        parts = rel.split("/")
        if parts[0] in KEEP:
            continue
        if rel == store.MANIFEST or _TMP.search(parts[-1]):
            doomed.append(p)
        elif parts[0] in (*SHARD_DIRS, store.WORK) and len(parts) == 2 and _SHARD_FILE.match(parts[1]):
            doomed.append(p)  # (_work/<shard>.parquet: a shard in flight, as curate before 0.x wrote it)
        elif parts[0] == store.WORK and len(parts) == 3 and is_name(parts[1]) and store.work_owned(parts[2]):
            doomed.append(p)  # a shard in flight: _work/<shard>/<a file curate writes there>
        elif (
            parts[0] == store.SELECTIONS
            and len(parts) >= 3
            and _selection_file(parts[1], "/".join(parts[2:]), store.selection_owned)
        ):
            doomed.append(p)
        else:
            left.append(rel)
    manifest = f"{top}/{store.MANIFEST}"
    # completion markers first, the manifest last: until then the folder is a (partly emptied) run
    for p in sorted(doomed, key=lambda p: (p == manifest, not p.endswith(store.MARKER_SUFFIX))):
        fs.rm(p)
    _remove_empty_dirs(fs, top)
    return left


def _selection_file(entry: str, rel: str, owned) -> bool:
    """Whether selections/<entry>/<rel> is a file curate wrote: a selection's own file, in its
    folder, a staging or parked copy, or a bucket version; or a bucket pointer."""
    if not (is_name(entry) or publish.is_transient(entry)):
        return False
    if rel == publish.POINTER:
        return True
    head, _, rest = rel.partition("/")
    return owned(rest) if publish.is_version(head) else owned(rel)


def _remove_empty_dirs(fs, top: str) -> None:
    if not io.is_local(top):
        return  # buckets have no empty folders

    for root, _dirs, _files in os.walk(top, topdown=False):
        if root != top and os.path.relpath(root, top).split(os.sep)[0] not in KEEP and not os.listdir(root):
            os.rmdir(root)


def describe_left(left: list[str]) -> str:
    return json.dumps(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
