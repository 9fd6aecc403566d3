"""Fetch stage: download one shard's images with img2dataset and account for every row.

img2dataset is driven one level below its CLI: we write the Arrow IPC file its Downloader reads,
call `Downloader.download_shard` ourselves (its `__call__` swallows shard failures) and read back
the parquet its ParquetSampleWriter wrote. Results are joined back by our `row` column, never by
order, and reconciled so that every input row gets exactly one status:

- a sample img2dataset raised on inside its loop is printed there and simply not written: such a
  row comes back as `lost` (and is logged), never silently missing;
- a shard-level failure raises FetchError naming the shard;
- URLs that are not http(s) are refused before img2dataset sees them (urllib would happily read
  file:// and ftp:// URLs from untrusted input).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Optional
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import FetchConfig
from curate.schema import (
    FETCH_ERROR,
    FETCH_STATUS,
    HEIGHT,
    IMAGE_BYTES,
    IMAGE_SHA256,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    ROW,
    URL,
    WIDTH,
    FetchStatus,
)

log = logging.getLogger(__name__)

STATUS_SCHEMA = pa.schema(
    [
        pa.field(ROW, pa.int64()),
        pa.field(FETCH_STATUS, pa.string()),
        pa.field(FETCH_ERROR, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(ORIGINAL_WIDTH, pa.int32()),
        pa.field(ORIGINAL_HEIGHT, pa.int32()),
        pa.field(IMAGE_SHA256, pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema([pa.field(ROW, pa.int64()), pa.field(IMAGE_BYTES, pa.binary())])

FETCHABLE_SCHEMES = frozenset({"http", "https"})

# img2dataset's names for things
_I2D_HASH = "sha256"  # its compute_hash column: sha256 of the bytes as downloaded
_I2D_IMAGE = "jpg"  # its encode_format, and the name of its image column
_I2D_STATUS = {
    "success": FetchStatus.OK,
    "failed_to_download": FetchStatus.DOWNLOAD_FAILED,
    "failed_to_resize": FetchStatus.DECODE_FAILED,
}
_SIZE_COLUMNS = (WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT)


class FetchError(RuntimeError):
    """A shard could not be fetched, or img2dataset's output broke an invariant. Names the shard."""


def fetch_shard(rows: pa.Table, cfg: FetchConfig, work_dir: str, shard: str) -> tuple[pa.Table, pa.Table]:
    """Fetch the images of one shard's rows (columns `row`, `url`, ...).

    Returns (status, images): `status` has exactly one row per input row (STATUS_SCHEMA, sorted by
    row); `images` holds the stored JPEG of each ok row (IMAGES_SCHEMA, sorted by row).
    Raises FetchError (naming the shard) when img2dataset fails for the shard as a whole.
    """
    rows = _checked_rows(rows, shard)
    fetchable, refused = _split_fetchable(rows)
    status_parts = [_refused_status(refused)]
    images = IMAGES_SCHEMA.empty_table()
    if fetchable.num_rows:
        results = _run_img2dataset(fetchable, cfg, work_dir, shard)
        status, images = reconcile(fetchable[ROW].to_pylist(), results, shard)
        status_parts.append(status)
    status = pa.concat_tables(status_parts).sort_by(ROW).combine_chunks()
    return status, images


# --- input ----------------------------------------------------------------------------------------
def _checked_rows(rows: pa.Table, shard: str) -> pa.Table:
    missing = {ROW, URL} - set(rows.column_names)
    if missing:
        raise ValueError(f"shard {shard!r}: fetch input lacks column(s) {sorted(missing)}")
    out = pa.table({ROW: rows[ROW].cast(pa.int64()), URL: rows[URL].cast(pa.string())})
    if out[ROW].null_count:
        raise ValueError(f"shard {shard!r}: fetch input has null `{ROW}` values")
    if len(pc.unique(out[ROW])) != out.num_rows:
        raise ValueError(f"shard {shard!r}: fetch input has duplicate `{ROW}` values")
    return out


def _refusal(url: Optional[str]) -> Optional[str]:
    """Why `url` is not handed to img2dataset, or None when it is."""
    if url is None or not url.strip():
        return "no URL"
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError as err:
        return f"invalid URL: {err}"
    if scheme not in FETCHABLE_SCHEMES:
        return f"refused URL scheme {scheme!r}: only http and https are fetched"
    return None


def _split_fetchable(rows: pa.Table) -> tuple[pa.Table, dict[int, str]]:
    reasons = [_refusal(u) for u in rows[URL].to_pylist()]
    refused = {r: why for r, why in zip(rows[ROW].to_pylist(), reasons) if why is not None}
    mask = pa.array([why is None for why in reasons], pa.bool_())
    return rows.filter(mask), refused


def _refused_status(refused: dict[int, str]) -> pa.Table:
    n = len(refused)
    return pa.table(
        {
            ROW: list(refused),
            FETCH_STATUS: [FetchStatus.DOWNLOAD_FAILED.value] * n,
            FETCH_ERROR: list(refused.values()),
            **{name: [None] * n for name in (*_SIZE_COLUMNS, IMAGE_SHA256)},
        },
        schema=STATUS_SCHEMA,
    )


# --- img2dataset ----------------------------------------------------------------------------------
def _run_img2dataset(rows: pa.Table, cfg: FetchConfig, work_dir: str, shard: str) -> pa.Table:
    """Run img2dataset's downloader on `rows` (columns row, url) in a private temp dir; returns its
    parquet output as a table. The temp dir is removed whatever happens."""
    os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"fetch-{_safe_name(shard)}-", dir=work_dir)
    try:
        in_path = os.path.join(tmp, "input.arrow")
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        _write_ipc_file(rows, in_path)
        downloader = _make_downloader(cfg, out_dir, column_list=[URL, ROW], n_samples=rows.num_rows)
        try:
            downloader.download_shard((0, in_path))
        except Exception as err:
            raise FetchError(f"shard {shard!r}: img2dataset failed: {type(err).__name__}: {err}") from err
        out_file = os.path.join(out_dir, "0.parquet")  # shard_id 0, oom_shard_count 1
        if not os.path.exists(out_file):
            raise FetchError(f"shard {shard!r}: img2dataset wrote no {out_file}")
        return pq.read_table(out_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_ipc_file(rows: pa.Table, path: str) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
        writer.write_table(rows)


def _make_downloader(cfg: FetchConfig, out_dir: str, column_list: list[str], n_samples: int) -> Any:
    # albumentations (imported by img2dataset's resizer) otherwise asks PyPI for a newer version on
    # import, over the network, and warns about it.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import downloader as i2d_downloader
    from img2dataset import resizer as i2d_resizer
    from img2dataset import writer as i2d_writer

    resizer = i2d_resizer.Resizer(
        image_size=cfg.image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_format=_I2D_IMAGE,
    )
    return i2d_downloader.Downloader(
        sample_writer_class=i2d_writer.ParquetSampleWriter,
        resizer=resizer,
        thread_count=cfg.threads,
        save_caption=False,
        extract_exif=False,
        output_folder=out_dir,
        column_list=column_list,
        timeout=cfg.timeout_s,
        number_sample_per_shard=max(n_samples, 10),  # keys are the sample's index in the file
        oom_shard_count=1,
        compute_hash=_I2D_HASH,
        verify_hash_type=None,
        encode_format=_I2D_IMAGE,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives),
    )


def _safe_name(shard: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", shard)[:64] or "shard"


# --- reconciliation -------------------------------------------------------------------------------
def reconcile(expected_rows: Sequence[int], results: pa.Table, shard: str) -> tuple[pa.Table, pa.Table]:
    """Turn img2dataset's output into (status, images) with exactly one status per expected row.

    `expected_rows` are in the order they were handed to img2dataset (the index is its sample key);
    `results` is its parquet output (row, status, error_message, sizes, sha256, jpg). A row with no
    record becomes `lost`; a duplicate record, a record for an unknown row or an unknown status
    raises FetchError.
    """
    position = _index_results(results, expected_rows, shard)
    cols = {name: results[name].to_pylist() for name in ("status", "error_message", *_SIZE_COLUMNS, _I2D_HASH)}
    has_image = pc.is_valid(results[_I2D_IMAGE]).to_pylist()
    out: dict[str, list[Any]] = {name: [] for name in STATUS_SCHEMA.names}
    ok_positions: list[int] = []
    lost: list[int] = []
    for key, row in enumerate(expected_rows):
        i = position.get(row)
        if i is None:
            lost.append(row)
            _append(out, row, FetchStatus.LOST, _lost_message(key))
            continue
        status = _I2D_STATUS.get(cols["status"][i])
        if status is None:
            raise FetchError(f"shard {shard!r}: img2dataset returned unknown status {cols['status'][i]!r} for row {row}")
        if status is not FetchStatus.OK:
            _append(out, row, status, cols["error_message"][i] or f"img2dataset: {cols['status'][i]}")
            continue
        if not has_image[i] or cols[_I2D_HASH][i] is None:
            raise FetchError(f"shard {shard!r}: img2dataset reported success without an image or hash for row {row}")
        ok_positions.append(i)
        _append(out, row, status, None, [cols[c][i] for c in _SIZE_COLUMNS], cols[_I2D_HASH][i])
    if lost:
        log.warning("shard %r: img2dataset returned no record for %d row(s), marked lost: %s", shard, len(lost), lost[:20])
    status_table = pa.table(out, schema=STATUS_SCHEMA).sort_by(ROW)
    images = results.select([ROW, _I2D_IMAGE]).take(pa.array(ok_positions, pa.int64()))
    images = images.rename_columns([ROW, IMAGE_BYTES]).cast(IMAGES_SCHEMA).sort_by(ROW).combine_chunks()
    return status_table, images


def _index_results(results: pa.Table, expected_rows: Sequence[int], shard: str) -> dict[int, int]:
    """row -> position of its record in `results`; raises on duplicates and unknown rows."""
    expected = set(expected_rows)
    position: dict[int, int] = {}
    for i, row in enumerate(results[ROW].to_pylist()):
        if row not in expected:
            raise FetchError(f"shard {shard!r}: img2dataset returned a record for row {row}, which was not requested")
        if row in position:
            raise FetchError(f"shard {shard!r}: img2dataset returned two records for row {row}")
        position[row] = i
    return position


def _lost_message(key: int) -> str:
    return (
        f"img2dataset returned no record for this row: an exception inside its download loop dropped "
        f"it (look for 'Sample {key} failed to download' in the worker's stdout)"
    )


def _append(
    out: dict[str, list[Any]],
    row: int,
    status: FetchStatus,
    error: Optional[str],
    sizes: Sequence[Optional[int]] = (None, None, None, None),
    sha256: Optional[str] = None,
) -> None:
    out[ROW].append(row)
    out[FETCH_STATUS].append(status.value)
    out[FETCH_ERROR].append(error)
    for name, value in zip(_SIZE_COLUMNS, sizes):
        out[name].append(value)
    out[IMAGE_SHA256].append(sha256)
