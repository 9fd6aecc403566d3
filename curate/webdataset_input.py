"""Pools already downloaded: img2dataset's (and DataComp's) webdataset shards as `curate run` input
(input.format = "webdataset"; docs/FETCH.md "Pools already downloaded").

img2dataset's webdataset writer lays a pool out as, per shard,

    NNNNN.tar            {key}.jpg (or .png/.webp: its encode_format), {key}.txt, {key}.json
                         for every row it downloaded
    NNNNN.parquet        one row per input row, downloaded or not: key, status, error_message,
                         width, height, original_width, original_height, [exif], [sha256], and
                         the input columns it was told to keep (url, caption, e.g. DataComp's uid)
    NNNNN_stats.json     its counters (not read here)

A pool shard goes through the same stages as a metadata shard. The read stage
(curate/stages/read.py) reads the parquet's url, caption and uid; the fetch stage
(curate/stages/fetch.py) takes each row's image from the tar instead of the network, and its
status from img2dataset's `status` and `error_message` (`fetch_status`): it produces exactly
what a fetch of that shard would, so scoring, annotation and selection are unchanged. No network
request is made.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import tarfile
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import io
from curate.config import InputConfig
from curate.schema import (
    FETCH_ERROR,
    FETCH_STATUS,
    HEIGHT,
    IMAGE_SHA256,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    ROW,
    WIDTH,
    FetchStatus,
)

log = logging.getLogger(__name__)

# columns of img2dataset's per-tar parquet (img2dataset/downloader.py)
KEY = "key"
STATUS = "status"
ERROR_MESSAGE = "error_message"
SHA256 = "sha256"  # its compute_hash column: sha256 of the bytes as served (curate's image_sha256)
SIZE_COLUMNS = {WIDTH: "width", HEIGHT: "height", ORIGINAL_WIDTH: "original_width", ORIGINAL_HEIGHT: "original_height"}
URL = "url"  # img2dataset renames the input's url_col and caption_col to these
CAPTION = "caption"
UID = "uid"  # DataComp's pools keep it (save_additional_columns=["uid"])

SUCCESS = "success"
STATUSES = (SUCCESS, "failed_to_download", "failed_to_resize")  # every status img2dataset writes
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")  # the member of a key that holds its image (encode_format)

_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")


class PoolError(RuntimeError):
    """A pool file that cannot be used; the message names the file (and the member or column)."""


# --- layout -----------------------------------------------------------------------------------------
def tar_stem(path: str) -> str:
    """The shard name of a pool tar: 00000 for .../00000.tar."""
    return posixpath.basename(path.rstrip("/")).removesuffix(".tar")


def parquet_path(tar: str) -> str:
    """The parquet img2dataset writes beside a tar: .../00000.tar -> .../00000.parquet."""
    return tar.removesuffix(".tar") + ".parquet"


def list_pool(url: str) -> list[str]:
    """The tars of a pool directory, glob or single tar (sorted, protocol kept). A directory or glob
    whose listing holds a parquet without its tar is refused: those rows would have no images."""
    files = io.list_files(url, suffix="")  # a directory: every file under it (one listing)
    tars = [p for p in files if p.endswith(".tar")]
    if not tars:
        raise PoolError(
            f"{url}: no .tar files found (input.format = 'webdataset' reads img2dataset's NNNNN.tar shards, "
            "each with its NNNNN.parquet beside it)"
        )
    listed = set(tars)
    for parquet in (p for p in files if p.endswith(".parquet")):
        tar = parquet.removesuffix(".parquet") + ".tar"
        if tar not in listed:
            raise PoolError(
                f"{parquet}: a pool parquet without its tar ({tar} is missing): its rows would have no images"
            )
    return tars


@functools.lru_cache(maxsize=4)
def _listing(paths: tuple[str, ...]) -> dict[str, str]:
    return {tar_stem(t): t for p in paths for t in list_pool(p)}


def shard_tar(cfg: InputConfig, shard: str) -> str:
    """The tar of the pool shard `shard` under input.paths (listed once per process, listed again
    when a shard is not found: a pool may have grown since)."""
    paths = tuple(cfg.paths)
    if shard not in _listing(paths):
        _listing.cache_clear()
    tar = _listing(paths).get(shard)
    if tar is None:
        raise PoolError(f"shard {shard!r}: no {shard}.tar under input.paths {list(paths)}")
    return tar


# --- the per-tar parquet ------------------------------------------------------------------------------
def pool_problem(table: pa.Table) -> Optional[str]:
    """What makes a pool parquet's key and status columns unusable (naming the column, a value and
    its row), or None. Read time: before anything is fetched or written."""
    status = table.column(STATUS)
    known = pc.fill_null(pc.is_in(status, value_set=pa.array(STATUSES)), False)
    if not pc.all(known).as_py() and len(status):
        first = pc.index(known, False).as_py()
        return (
            f"column {STATUS!r}: {len(known) - pc.sum(known).as_py()} value(s) img2dataset never writes, e.g. "
            f"{status[first].as_py()!r} (row {first}); expected one of {', '.join(STATUSES)}"
        )
    seen: dict[str, int] = {}
    for row, key in enumerate(table.column(KEY).to_pylist()):
        if key is None or str(key) == "":
            return f"column {KEY!r}: no key at row {row}"
        if key in seen:
            return f"column {KEY!r}: key {key!r} at rows {seen[key]} and {row} (each key names one tar member)"
        seen[key] = row
    return None


def _rows_meta(parquet: str, tar: str, rows: list[int]) -> list[dict[str, Any]]:
    """key, status, error message, sizes and sha256 of `rows` (positions in the parquet)."""
    wanted = [KEY, STATUS, ERROR_MESSAGE, SHA256, *SIZE_COLUMNS.values()]
    try:
        fs, p = io.fs_and_path(parquet)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            for col in (KEY, STATUS):
                if col not in names:
                    raise PoolError(f"{parquet}: missing column {col!r} (img2dataset writes it); columns: {names}")
            table = pf.read(columns=[c for c in wanted if c in names])
    except PoolError:
        raise
    except FileNotFoundError as e:
        raise PoolError(f"{tar}: no parquet beside this tar (expected {parquet}): {e}") from e
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise PoolError(f"{parquet}: not a readable parquet file: {type(e).__name__}: {e}") from e
    beyond = [r for r in rows if not 0 <= r < table.num_rows]
    if beyond:
        raise PoolError(f"{parquet}: has {table.num_rows} rows, no row {beyond[0]} (it changed since the run read it)")
    return table.take(pa.array(rows, pa.int64())).to_pylist()


# --- statuses -----------------------------------------------------------------------------------------
def fetch_status(status: str, error_message: Optional[str]) -> FetchStatus:
    """img2dataset's per-row outcome (status, error_message) as curate's fetch status."""
    if status == SUCCESS:
        return FetchStatus.OK
    text = error_message or ""
    low = text.lower()
    if status == "failed_to_resize":  # its Resizer: the bytes did not decode (or one of its own size limits)
        return FetchStatus.TOO_MANY_PIXELS if "image area too large" in low else FetchStatus.DECODE_ERROR
    if "x-robots-tag" in low:
        return FetchStatus.OPT_OUT
    if low == "hash mismatch":
        return FetchStatus.HASH_MISMATCH
    http = _HTTP_ERROR.search(text)
    if http:
        return _http_status(int(http.group(1)))
    if "timed out" in low:
        return FetchStatus.TIMEOUT
    if "unknown url type" in low:
        return FetchStatus.BAD_URL
    if low.startswith("<urlopen error") or "connection" in low:
        return FetchStatus.CONNECTION_ERROR
    return FetchStatus.DOWNLOAD_FAILED


def _http_status(code: int) -> FetchStatus:
    if code == 429:
        return FetchStatus.RATE_LIMITED
    if code == 408:
        return FetchStatus.TIMEOUT
    if 300 <= code < 400:  # urllib gives up on a redirect loop with the 3xx code
        return FetchStatus.TOO_MANY_REDIRECTS
    if 400 <= code < 500:
        return FetchStatus.HTTP_4XX
    if 500 <= code < 600:
        return FetchStatus.HTTP_5XX
    return FetchStatus.DOWNLOAD_FAILED


def _record(row: int, status: FetchStatus, error: Optional[str], meta: Optional[dict] = None) -> dict[str, Any]:
    meta = meta or {}
    sha = meta.get(SHA256)
    return {
        ROW: row,
        FETCH_STATUS: status.value,
        FETCH_ERROR: error,
        **{ours: meta.get(theirs) for ours, theirs in SIZE_COLUMNS.items()},
        IMAGE_SHA256: sha.lower() if isinstance(sha, str) and sha else None,
    }


# --- the tar ------------------------------------------------------------------------------------------
def _member_index(tar: str) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data, size), from the tar's headers; cached per process by the
    tar's size and version (mtime, ETag), so the windows of one shard scan it once."""
    fs, p = io.fs_and_path(tar)
    try:
        info = fs.info(p)
    except FileNotFoundError as e:
        raise PoolError(f"{tar}: file not found ({e})") from e
    return _indexed(tar, int(info.get("size") or 0), io.version_tag(info))


@functools.lru_cache(maxsize=8)
def _indexed(tar: str, size: int, version: Optional[str]) -> dict[str, tuple[int, int]]:
    fs, p = io.fs_and_path(tar)
    index: dict[str, tuple[int, int]] = {}
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise PoolError(
                        f"{tar}: corrupt tar: member {m.name} is truncated ({m.size} bytes from byte "
                        f"{m.offset_data}, the file has {size})"
                    )
                index[m.name.removeprefix("./")] = (m.offset_data, m.size)
            end = tf.offset
            f.seek(end)
            tail = f.read(tarfile.BLOCKSIZE)
    except PoolError:
        raise
    except FileNotFoundError as e:
        raise PoolError(f"{tar}: file not found ({e})") from e
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise PoolError(f"{tar}: not a readable tar file: {type(e).__name__}: {e}") from e
    if tail.strip(b"\0"):  # tarfile ends quietly at a header it cannot parse: that is no end of archive
        raise PoolError(f"{tar}: corrupt tar: no valid member header at byte {end} (after {len(index)} member(s))")
    return index


def _image_member(index: dict[str, tuple[int, int]], key: str) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        if f"{key}.{ext}" in index:
            return f"{key}.{ext}"
    return None


def _read_members(tar: str, index: dict[str, tuple[int, int]], names: dict[int, str]) -> dict[int, bytes]:
    """row -> the bytes of its member, read in the tar's order."""
    fs, p = io.fs_and_path(tar)
    out: dict[int, bytes] = {}
    with fs.open(p, "rb") as f:
        for row, name in sorted(names.items(), key=lambda kv: index[kv[1]][0]):
            offset, size = index[name]
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise PoolError(f"{tar}: corrupt tar: member {name} has {len(data)} of its {size} bytes")
            out[row] = data
    return out


def pool_images(rows: pa.Table, cfg: InputConfig, shard: str) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]]]:
    """The fetch of one window of a pool shard (`rows`: its `row` column): one status record per row
    (curate/stages/fetch.py STATUS_SCHEMA's columns) and (row, image bytes) for each ok row. A
    success row whose image member is missing from the tar is `lost` (named in fetch_error); a
    tar or parquet that cannot be read raises PoolError naming it."""
    tar = shard_tar(cfg, shard)
    wanted = rows.column(ROW).to_pylist()
    metas = _rows_meta(parquet_path(tar), tar, wanted)
    records: list[dict[str, Any]] = []
    members: dict[int, str] = {}
    by_row: dict[int, dict[str, Any]] = {}
    index = _member_index(tar) if any(m[STATUS] == SUCCESS for m in metas) else {}
    for row, meta in zip(wanted, metas):
        status = meta[STATUS]
        if status != SUCCESS:
            detail = f"img2dataset {status}: {meta.get(ERROR_MESSAGE)}"
            records.append(_record(row, fetch_status(status, meta.get(ERROR_MESSAGE)), detail))
            continue
        name = _image_member(index, meta[KEY])
        if name is None:
            log.warning(
                "%s: no image member for key %r (row %d), which img2dataset's parquet says succeeded",
                tar,
                meta[KEY],
                row,
            )
            detail = (
                f"{tar}: no member {meta[KEY]}.jpg (nor .png/.webp/.jpeg), although the pool's parquet says success"
            )
            records.append(_record(row, FetchStatus.LOST, detail))
            continue
        members[row] = name
        by_row[row] = meta
    images = _read_members(tar, index, members) if members else {}
    for row in images:
        records.append(_record(row, FetchStatus.OK, None, by_row[row]))
    return records, sorted(images.items())
