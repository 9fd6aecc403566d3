"""What `curate export` writes into its output folder, byte for byte: file names, which names are
curate's own, the per-sample metadata, and deterministic tar archives. No run-directory or Ray
code here (curate/export.py plans and runs the export; curate/export_source.py reads the run).

    TO/
      00000.tar            webdataset shard: per row <key>.jpg (the cached bytes), <key>.json, <key>.txt
      00000.parquet        webdataset: the shard's index, one row per assigned row (img2dataset's
                           columns; rows without a cached image have status failed_to_download);
                           parquet format: the shard's rows (url, caption, metadata) for img2dataset
      00000_stats.json     webdataset: img2dataset's per-shard stats (no clock times: reruns are
                           byte-identical)
      00000.done           the shard's completion marker, written last (its files' sizes and sha256)
      _missing.parquet     webdataset: every assigned row whose image is not in the run's cache
      sizes.json           webdataset: samples per tar (open_clip_train reads it for the dataset size)
      _uids_not_found.npy  --uids: the listed uids no row of the run has (DataComp's format)
      _export.json         counts, source and settings, written last of all

Keys follow img2dataset's `compute_key`: shard * 10**ceil(log10(shard_size)) + position in the
shard, zero-padded to that many digits plus five, so `--shard-size 10000` gives 000030007.
"""

from __future__ import annotations

import io as _io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from curate import schema

FORMATS = ("webdataset", "parquet")
DEFAULT_SHARD_SIZE = 10_000
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 00000.tar
LAYOUT_VERSION = 1  # part of every marker's fingerprint: a layout change rewrites old shards

SUMMARY = "_export.json"
# written first into a folder an export starts in: shard-shaped names (00000.tar, ...) are also what
# img2dataset writes, so they count as curate export's own only in a folder that holds this claim
CLAIM = "_curate_export.json"
MISSING = "_missing.parquet"
SIZES = "sizes.json"
UIDS_NOT_FOUND = "_uids_not_found.npy"

SUCCESS = "success"  # img2dataset's status of a written sample
FAILED = "failed_to_download"  # img2dataset's status of a row without an image

_SHARD_FILE = re.compile(r"^\d{%d,}(\.tar|\.parquet|_stats\.json|\.done)$" % SHARD_DIGITS)
_TEMP = re.compile(r"^(?P<name>.+)\.tmp-[0-9a-f]{32}$")  # curate.io's atomic local write in progress


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def tar_name(index: int) -> str:
    return f"{shard_name(index)}.tar"


def index_name(index: int) -> str:
    return f"{shard_name(index)}.parquet"


def stats_name(index: int) -> str:
    return f"{shard_name(index)}_stats.json"


def marker_name(index: int) -> str:
    return f"{shard_name(index)}.done"


def shard_files(fmt: str, index: int) -> list[str]:
    """The data files of output shard `index` (its marker not included), in the order written."""
    if fmt == "webdataset":
        return [tar_name(index), index_name(index), stats_name(index)]
    return [index_name(index)]


def shard_index_of(name: str) -> int | None:
    """The output shard a file name belongs to (00003.tar -> 3), or None for the folder's own files."""
    return int(re.match(r"^\d+", name).group()) if _SHARD_FILE.match(name) else None


def is_own_final(name: str) -> bool:
    """A file name that `curate export` writes (not a temporary one)."""
    return _SHARD_FILE.match(name) is not None or name in (SUMMARY, MISSING, SIZES, UIDS_NOT_FOUND, CLAIM)


def is_own_temp(name: str) -> bool:
    """A temporary file of an interrupted atomic write of one of our files (`00003.tar.tmp-<id>`)."""
    m = _TEMP.match(name)
    return m is not None and is_own_final(m["name"])


def owned(rel: str) -> bool:
    """Whether `rel`, a path inside an export folder, is a file `curate export` writes there;
    anything else is someone else's: the folder is refused and nothing is deleted."""
    return "/" not in rel and (is_own_final(rel) or is_own_temp(rel))


def key_of(index: int, position: int, shard_size: int) -> str:
    """img2dataset's compute_key(position, index, ceil(log10(shard_size)), SHARD_DIGITS)."""
    digits = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    return f"{10**digits * index + position:0{digits + SHARD_DIGITS}d}"


# --- per-sample metadata -------------------------------------------------------------------------
# (name in the sample's json / the shard's index, type, the run's column it comes from). The order
# is img2dataset's: the input columns, then key, status, error_message, the sizes and sha256.
# sha256 is the hash of the bytes the URL served (img2dataset's compute_hash): the run's
# image_sha256, else the input's own sha256 column (a row scored from input columns, never fetched).
META_FIELDS: list[tuple[str, pa.DataType, str | None]] = [
    ("url", pa.string(), schema.URL),
    ("caption", pa.string(), schema.CAPTION),
    ("uid", pa.string(), schema.UID),
    ("clip_score", pa.float32(), schema.CLIP_SCORE),
    ("language", pa.string(), schema.LANGUAGE),
    ("domain", pa.string(), schema.DOMAIN),
    ("source_shard", pa.string(), schema.SHARD),
    ("source_row", pa.int64(), schema.ROW),
    ("key", pa.string(), None),
    ("status", pa.string(), None),
    ("error_message", pa.string(), None),
    ("width", pa.int32(), schema.WIDTH),
    ("height", pa.int32(), schema.HEIGHT),
    ("original_width", pa.int32(), schema.ORIGINAL_WIDTH),
    ("original_height", pa.int32(), schema.ORIGINAL_HEIGHT),
    ("sha256", pa.string(), schema.IMAGE_SHA256),
]
META_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in META_FIELDS])
# the parquet format: what img2dataset takes as input (url_col="url", caption_col="caption") and
# can verify a re-download against (verify_hash=["sha256", "sha256"]), plus the metadata
PAIR_FIELDS = [f for f in META_FIELDS if f[0] not in ("key", "status", "error_message", "width", "height")]
PAIR_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in PAIR_FIELDS])
MISSING_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("tar", pa.string()),
        pa.field("key", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a non-finite float is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sample_json(meta: dict[str, Any]) -> bytes:
    """A sample's <key>.json, as img2dataset writes it (json.dumps(meta, indent=4))."""
    return json.dumps(meta, indent=4).encode("utf-8")


def sample_txt(caption: str | None) -> bytes:
    return ("" if caption is None else str(caption)).encode("utf-8")


def stats(rows: int, exported: int, errors: dict[str, int]) -> dict[str, Any]:
    """img2dataset's <shard>_stats.json fields, less its clock times (duration, start_time,
    end_time), so that a rerun writes the same bytes. status_dict counts outcomes as
    img2dataset's does: "success" and each error message (`errors`: message -> rows)."""
    return {
        "count": rows,
        "successes": exported,
        "failed_to_download": sum(errors.values()),
        "failed_to_resize": 0,
        "status_dict": {**({SUCCESS: exported} if exported else {}), **dict(sorted(errors.items()))},
    }


# --- deterministic tar archives ------------------------------------------------------------------
class ChunkSink:
    """A write-only file that hands what was written to a generator in pieces (`drain()`), so a
    tar or parquet file streams into curate.io.atomic_write_chunks without being held whole."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        b = bytes(data)
        self._parts.append(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def drain(self) -> Iterator[bytes]:
        parts, self._parts = self._parts, []
        yield from parts


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular file entry with nothing of this machine or this moment in it."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def tar_chunks(samples: Iterable[tuple[str, dict[str, bytes]]]) -> Iterator[bytes]:
    """A ustar archive of `samples` ((key, {extension: bytes})), members in sample order and, within
    a sample, by extension: the same input gives the same bytes on any machine, at any time."""
    sink = ChunkSink()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext in sorted(files):
                data = files[ext]
                tar.addfile(_member(f"{key}.{ext}", len(data)), _io.BytesIO(data))
            yield from sink.drain()
    yield from sink.drain()
