"""The boundary gallery's rows: caption, URL and thumbnail of the few rows the gallery picked, read
shard by shard with the row filter in the scan, by a task per shard when the selection runs on an
executor (selection.engine = "ray"), so the driver receives the picked rows only.

Reading in the driver held one shard's caption and URL pages at a time (and, with images, a
shard's image column): the selection's driver peaked there, last, growing with the pool's shards
(docs/SCALE.md). A task's peak is one shard's; the driver holds the picked rows (a few per shown
group) and their thumbnails.
"""

from __future__ import annotations

import base64
import io as _io

import polars as pl
import pyarrow.parquet as pq
from PIL import Image

from curate import io, schema, store
from curate.annotations import scan as scan_annotations
from curate.executor import Executor, Resources

THUMB_PX = 112
TASK = Resources(cpus=1)
THUMB = "thumb"
COLUMNS = {
    schema.SHARD: pl.String,
    schema.ROW: pl.Int64,
    schema.CAPTION: pl.String,
    schema.URL: pl.String,
    THUMB: pl.String,
}


def thumbnail(jpg: bytes) -> str | None:
    """A small JPEG data URI of the image, or None for a corrupt cached image (shown as "no
    image": never fails the report)."""
    try:
        im = Image.open(_io.BytesIO(jpg))
        im = im.convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = _io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:
        return None


def shard_rows(run_dir: str, shard: str, rows: list[int]) -> pl.DataFrame:
    """(shard, row, caption, url, thumb) of `rows` of one shard of the run: the row filter is in
    both scans (annotations, and the cached images when the run has them), so only those rows'
    values are kept."""
    text = (
        scan_annotations(run_dir, [shard])
        .filter(pl.col(schema.ROW).is_in(rows))
        .select(schema.SHARD, pl.col(schema.ROW).cast(pl.Int64), schema.CAPTION, schema.URL)
        .collect(engine="streaming")
    )
    thumbs = pl.DataFrame(schema={schema.ROW: pl.Int64, THUMB: pl.String})
    path = store.images_path(run_dir, shard)
    if io.exists(path):
        fs, local = io.fs_and_path(path)
        with fs.open(local, "rb") as f:  # pyarrow filters batch by batch: one batch of images held
            found = pq.read_table(f, columns=[schema.ROW, schema.IMAGE_BYTES], filters=[(schema.ROW, "in", rows)])
        thumbs = pl.DataFrame(
            {
                schema.ROW: found[schema.ROW].to_pylist(),
                THUMB: [thumbnail(b) if b else None for b in found[schema.IMAGE_BYTES].to_pylist()],
            },
            schema={schema.ROW: pl.Int64, THUMB: pl.String},
        )
    return text.join(thumbs, on=schema.ROW, how="left").select(list(COLUMNS)).cast(COLUMNS)


def picked_rows(run_dir: str, by_shard: dict[str, list[int]], executor: Executor | None = None) -> pl.DataFrame:
    """shard_rows of every shard in `by_shard`: one task per shard on `executor`, else here."""
    shards = sorted(by_shard)
    if executor is None:
        parts = [shard_rows(run_dir, s, by_shard[s]) for s in shards]
    else:
        parts = executor.results([executor.submit(shard_rows, run_dir, s, by_shard[s], resources=TASK) for s in shards])
    return pl.concat(parts) if parts else pl.DataFrame(schema=COLUMNS)
