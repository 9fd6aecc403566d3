"""The run directory's layout, in one place: every path of a run is made here, and no other module
spells a folder name (tests/test_structure.py holds us to that).

    RUN_DIR/
      .curate.lock                  the writer lock (curate/run_lock.py)
      manifest.json                 what the run was made from and did (curate/manifest.py)
      annotations/<shard>.parquet   one row per input row (curate/annotations.py)
      annotations/<shard>.done      the shard's completion marker, written last
      images/<shard>.parquet        fetched images (row, jpg)
      embeddings/<shard>.parquet    CLIP image embeddings + pHash (score.store_embeddings)
      _work/<shard>/                a shard in flight (removed when it is done; redone from the
                                    input or the finished files when a run was killed):
        annotations.parquet           its annotation rows, fetch and score still to fill in
        todo.parquet                  the rows to fetch, one row group per window
        w<k>.fetched.parquet          window k's fetch statuses (written by its fetch task)
        w<k>.images.parquet           window k's stored images + captions (row, caption, jpg)
        w<k>.scores.parquet           window k's CLIP scores (written by a scoring actor)
        w<k>.embeddings.parquet       window k's image embeddings (score.store_embeddings)
      selections/<name>/            one selection, published whole (curate/publish.py)
      forget/keys.parquet, forget/requests.json   deletion requests (curate/forget.py)

Paths are local or bucket URLs alike (curate.io.join).
"""

from __future__ import annotations

import re

from curate import io
from curate.names import check_name
from curate.records import ShardMarker

ANNOTATIONS = "annotations"
IMAGES = "images"
EMBEDDINGS = "embeddings"
WORK = "_work"
SELECTIONS = "selections"
FORGET = "forget"
MANIFEST = "manifest.json"
LOCK = ".curate.lock"

SHARD_DIRS = (ANNOTATIONS, IMAGES, EMBEDDINGS)  # one file per shard each
# _work/ holds a folder per shard in flight (work_shard_dir)
OUTPUT_DIRS = (ANNOTATIONS, IMAGES, EMBEDDINGS, SELECTIONS, FORGET)  # what the manifest checksums
MARKER_SUFFIX = ".done"


def manifest_path(run_dir: str) -> str:
    return io.join(run_dir, MANIFEST)


def lock_path(run_dir: str) -> str:
    return io.join(run_dir, LOCK)


def folder(run_dir: str, name: str) -> str:
    """RUN_DIR/<one of the folders above>."""
    if name not in (*SHARD_DIRS, WORK, SELECTIONS, FORGET):
        raise ValueError(f"{name!r} is not a run directory folder")
    return io.join(run_dir, name)


def annotations_dir(run_dir: str) -> str:
    return io.join(run_dir, ANNOTATIONS)


def annotation_path(run_dir: str, shard: str) -> str:
    return io.join(run_dir, ANNOTATIONS, f"{shard}.parquet")


def marker_path(run_dir: str, shard: str) -> str:
    return io.join(run_dir, ANNOTATIONS, f"{shard}{MARKER_SUFFIX}")


def _read_marker_json(run_dir: str, shard: str) -> tuple[object, str]:
    p = marker_path(run_dir, shard)
    try:
        return io.read_json(p), p
    except (ValueError, UnicodeDecodeError) as e:  # json names the position, not the file
        raise ValueError(f"{p}: not a readable completion marker ({e})") from None


def read_marker(run_dir: str, shard: str) -> ShardMarker:
    """The one way a shard's completion marker is read: a ShardMarker, or a ValueError naming the
    file and the key that is missing or wrong (curate/records.py)."""
    data, p = _read_marker_json(run_dir, shard)
    return _of_shard(ShardMarker.from_json(data, p), shard, p)


def read_marker_or_bare(run_dir: str, shard: str) -> ShardMarker | None:
    """As read_marker, but a bare marker (an empty object, {}: a shard marked done by hand, as in
    hand-made run directories) is None: it says the shard is done and nothing about its counts.
    Only the selection accounting accepts one (curate/accounting.py); anything else in the file
    is read strictly."""
    data, p = _read_marker_json(run_dir, shard)
    return None if data == {} else _of_shard(ShardMarker.from_json(data, p), shard, p)


def _of_shard(marker: ShardMarker, shard: str, path: str) -> ShardMarker:
    if marker.shard != shard:  # a marker copied from another shard would vouch for the wrong file
        raise ValueError(f"{path}: the completion marker is for shard {marker.shard!r}, not {shard!r}")
    return marker


def write_marker(run_dir: str, marker: ShardMarker) -> None:
    """The one way a completion marker is written (atomically: a reader sees the old one or the new)."""
    io.write_json(marker_path(run_dir, marker.shard), marker.to_json())


def images_path(run_dir: str, shard: str) -> str:
    return io.join(run_dir, IMAGES, f"{shard}.parquet")


def embeddings_path(run_dir: str, shard: str) -> str:
    return io.join(run_dir, EMBEDDINGS, f"{shard}.parquet")


def work_dir(run_dir: str) -> str:
    return io.join(run_dir, WORK)


def work_shard_dir(run_dir: str, shard: str) -> str:
    """_work/<shard>/: everything of a shard in flight (curate/shard_jobs.py)."""
    return io.join(run_dir, WORK, shard)


def work_path(run_dir: str, shard: str) -> str:
    """The annotation rows of a shard in flight."""
    return io.join(work_shard_dir(run_dir, shard), "annotations.parquet")


def work_todo_path(run_dir: str, shard: str) -> str:
    """The rows of a shard in flight that are to be fetched, one parquet row group per window."""
    return io.join(work_shard_dir(run_dir, shard), "todo.parquet")


WINDOW_FILES = ("fetched", "images", "scores", "embeddings")  # what a window of a shard in flight writes


def window_path(run_dir: str, shard: str, window: int, kind: str) -> str:
    """_work/<shard>/w<window>.<kind>.parquet, kind one of WINDOW_FILES."""
    if kind not in WINDOW_FILES:
        raise ValueError(f"{kind!r} is not a window file ({', '.join(WINDOW_FILES)})")
    return io.join(work_shard_dir(run_dir, shard), f"w{window:05d}.{kind}.parquet")


_WORK_FILE = re.compile(r"^(annotations|todo|w\d{5,}\.(" + "|".join(WINDOW_FILES) + r"))\.parquet$")


def work_owned(name: str) -> bool:
    """Whether `name`, a file in _work/<shard>/, is one that curate writes there."""
    return _WORK_FILE.match(name) is not None


def in_flight_shards(run_dir: str) -> list[str]:
    """Shards with a _work/<shard>/ folder: begun by a run that has not finished them."""
    top = work_dir(run_dir)
    fs, path = io.fs_and_path(top)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))


def discard_in_flight(run_dir: str, shard: str) -> None:
    """Remove what a run wrote of a shard in flight (only files curate writes there; the folder goes
    when that leaves it empty). Nothing is lost: a run redoes an unfinished shard from its input,
    or from its finished files when it was extending them."""
    d = work_shard_dir(run_dir, shard)
    fs, path = io.fs_and_path(d)
    if not fs.exists(path):
        return
    for p in fs.ls(path, detail=False):
        if work_owned(p.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm(p)
    if io.is_local(d) and fs.exists(path) and not fs.ls(path, detail=False):
        fs.rmdir(path)


def selections_dir(run_dir: str) -> str:
    return io.join(run_dir, SELECTIONS)


def selection_dir(run_dir: str, name: str) -> str:
    """The folder of selection `name` (its published version may sit below it on a bucket:
    curate.selection.readable_dir)."""
    return io.join(run_dir, SELECTIONS, check_name(name, "selection name"))


# what a selection folder holds, all written by curate.selection.write_selection
SELECTION_FILES = frozenset({"selection.json", "report.json", "report.html", "uids.npy"})
SELECTION_DIRS = frozenset({"kept", "removed", "decisions", "tables"})  # <shard or table>.parquet each


def selection_owned(rel: str) -> bool:
    """Whether `rel` (a path inside a selection folder) is a file curate writes there; anything
    else is someone else's, and is never deleted (curate/publish.py, curate/run_dir.py)."""
    parts = rel.split("/")
    return (len(parts) == 1 and parts[0] in SELECTION_FILES) or (
        len(parts) == 2 and parts[0] in SELECTION_DIRS and parts[1].endswith(".parquet")
    )


def forget_dir(run_dir: str) -> str:
    return io.join(run_dir, FORGET)
