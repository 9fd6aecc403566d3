"""Where the rows of `curate export` come from, one input shard at a time, and their cached images.

Two sources:
- a selection: its kept rows, in the run's input-shard order then row order (the kept parquet
  files of the selection's published version; for a selection written with write = "decisions",
  the run's annotation rows its decisions keep). The driver plans from the per-shard kept counts
  in selection.json, without reading a row.
- a DataComp uid file (`--uids`, the resharder's step): every row of the run whose uid is listed.
  A count task per input shard says how many rows match, and which listed uids they hold, so the
  driver can plan and count the uids no row has, again without holding the rows.

The image of a row is the bytes the fetch stored for it in images/<shard>.parquet (column jpg,
keyed by row: curate/stages/fetch.py), exported as they are.
"""

from __future__ import annotations

import hashlib
import io as _io
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import annotations, io, publish, schema, selection_files, store

# the run's columns an export reads (a row's metadata: curate/export_layout.py META_FIELDS)
READ_COLUMNS = [
    schema.SHARD,
    schema.ROW,
    schema.UID,
    schema.URL,
    schema.CAPTION,
    schema.CLIP_SCORE,
    schema.LANGUAGE,
    schema.DOMAIN,
    schema.WIDTH,
    schema.HEIGHT,
    schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT,
    schema.IMAGE_SHA256,
    schema.EXPECTED_SHA256,
]
READ_SCHEMA = pa.schema([annotations.FIELDS[c] for c in READ_COLUMNS])
UID_DTYPE = selection_files.UID_DTYPE  # DataComp's (high u64, low u64) pairs


@dataclass(frozen=True)
class Source:
    """What an export reads: `kind` is "kept" (a selection's kept files), "decisions" (a selection
    written with write = "decisions": annotations joined to its decisions) or "uids"."""

    run_dir: str
    kind: str
    selection: str | None = None
    selection_dir: str | None = None  # the published version, resolved once when the export is planned
    uids_file: str | None = None

    def describe(self) -> dict:
        if self.kind == "uids":
            return {"uids_file": self.uids_file}
        return {"selection": self.selection, "selection_dir": self.selection_dir}


# --- a selection ---------------------------------------------------------------------------------
def selection_summary_path(selection_dir: str) -> str:
    return io.join(selection_dir, "selection.json")


def selection_source(run_dir: str, name: str) -> tuple[Source, list[tuple[str, int]], dict]:
    """(source, [(input shard, kept rows)] in shard order, what the selection says of itself)
    from the selection's published selection.json; an error names the file and the key."""
    sel_dir = publish.resolve(store.selection_dir(run_dir, name))
    path = selection_summary_path(sel_dir)
    if not io.exists(path):
        raise FileNotFoundError(
            f"{path}: no selection {name!r} in {run_dir} (make it with `curate select {run_dir} --name {name}`)"
        )
    summary = io.read_json(path)
    try:
        shards = summary["shards"]
        counts = [(shard, int(shards[shard]["kept"])) for shard in sorted(shards)]
        kept = int(summary["counts"]["kept"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: no per-shard kept counts (key {e}); rewrite it with `curate select`") from None
    write = (summary.get("rules") or {}).get("write", "full")
    source = Source(run_dir, "decisions" if write == "decisions" else "kept", name, sel_dir)
    return source, counts, {"created_at": summary.get("created_at"), "write": write, "kept": kept}


def selection_created_at(source: Source) -> str | None:
    """The selection's creation time now (a selection republished during an export changes it)."""
    path = selection_summary_path(publish.resolve(store.selection_dir(source.run_dir, source.selection)))
    return io.read_json(path).get("created_at") if io.exists(path) else None


def _kept_path(selection_dir: str, shard: str) -> str:
    return io.join(selection_dir, "kept", f"{shard}.parquet")


def _decisions_path(selection_dir: str, shard: str) -> str:
    return io.join(selection_dir, "decisions", f"{shard}.parquet")


# --- a uid file ------------------------------------------------------------------------------------
def load_uid_file(path: str) -> tuple[np.ndarray, dict]:
    """The distinct uids of a DataComp uid file (a 1-d .npy of (u8, u8) pairs, as `curate select`
    writes uids.npy), sorted, and {entries, distinct, sha256 of the distinct pairs}."""
    fs, p = io.fs_and_path(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    try:
        arr = np.load(_io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a .npy file ({e}); --uids takes a DataComp uid file") from None
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise ValueError(
            f"{path}: dtype {arr.dtype}, shape {arr.shape}; --uids takes DataComp's uid format, a 1-d array "
            f"of dtype {UID_DTYPE} (the high and low 64 bits of each 32-hex-digit uid, as uids.npy holds them)"
        )
    distinct = np.unique(arr)
    info = {
        "entries": int(len(arr)),
        "distinct": int(len(distinct)),
        "sha256": hashlib.sha256(distinct.tobytes()).hexdigest(),
    }
    return distinct, info


def match_uids(uids: pa.ChunkedArray | pa.Array, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the rows whose uid is in `wanted`, the positions in `wanted` of their uids). A uid
    that is not 32 hex digits cannot be in a DataComp list: it never matches."""
    s = pl.Series("uid", uids, dtype=pl.String)
    valid = s.str.contains(r"^[0-9a-fA-F]{32}$").fill_null(False).to_numpy()
    hi, lo = selection_files.uid_halves(s.filter(pl.Series(valid)))
    pairs = np.empty(len(hi), UID_DTYPE)
    pairs["f0"], pairs["f1"] = hi, lo
    pos = np.searchsorted(wanted, pairs)
    inside = pos < len(wanted)
    hit = np.zeros(len(pairs), dtype=bool)
    hit[inside] = wanted[pos[inside]] == pairs[inside]
    mask = np.zeros(len(s), dtype=bool)
    mask[valid] = hit
    return mask, pos[hit]


def count_matches(run_dir: str, shard: str, wanted: np.ndarray) -> tuple[int, np.ndarray]:
    """A count task: how many rows of `shard` have a listed uid, and which listed uids (positions
    in `wanted`, distinct) they hold."""
    uids = annotations.scan(run_dir, [shard]).select(schema.UID).collect().get_column(schema.UID)
    mask, pos = match_uids(uids.to_arrow(), wanted)
    return int(mask.sum()), np.unique(pos)


# --- rows ------------------------------------------------------------------------------------------
def shard_rows(source: Source, shard: str, wanted: np.ndarray | None = None) -> pa.Table:
    """The rows `source` exports from input shard `shard` (READ_SCHEMA), in row order."""
    if source.kind == "kept":
        table = _read_columns(_kept_path(source.selection_dir, shard), READ_COLUMNS)
    elif source.kind == "decisions":
        rows = _annotation_rows(source.run_dir, shard)
        dec = pl.from_arrow(io.read_parquet(_decisions_path(source.selection_dir, shard), [schema.ROW, schema.KEPT]))
        kept = dec.filter(pl.col(schema.KEPT)).get_column(schema.ROW)
        table = rows.filter(pc.is_in(rows.column(schema.ROW), value_set=kept.to_arrow()))
    elif source.kind == "uids":
        rows = _annotation_rows(source.run_dir, shard)
        table = rows.filter(pa.array(match_uids(rows.column(schema.UID), wanted)[0]))
    else:
        raise ValueError(f"unknown export source {source.kind!r}")
    return _conform(table).sort_by(schema.ROW)


def _annotation_rows(run_dir: str, shard: str) -> pa.Table:
    lf = annotations.scan(run_dir, [shard])
    have = lf.collect_schema().names()
    return lf.select([c for c in READ_COLUMNS if c in have]).collect().to_arrow()


def _read_columns(url: str, columns: list[str]) -> pa.Table:
    """The `columns` a parquet file has (a file written before a column existed lacks it)."""
    fs, path = io.fs_and_path(url)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{url}: not a readable parquet file ({e})") from None


def _conform(table: pa.Table) -> pa.Table:
    """READ_SCHEMA's columns and types; a column the run does not have is null."""
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in READ_SCHEMA
    ]
    return pa.Table.from_arrays(cols, schema=READ_SCHEMA)


def cached_images(run_dir: str, shard: str, rows: list[int]) -> dict[int, bytes]:
    """row -> stored image bytes, for those of `rows` the run's image cache holds ({} when the
    shard has no images file: a run that fetched nothing)."""
    url = store.images_path(run_dir, shard)
    if not rows or not io.exists(url):
        return {}
    fs, path = io.fs_and_path(url)
    with fs.open(path, "rb") as f:
        try:
            t = pq.read_table(f, columns=[schema.ROW, schema.IMAGE_BYTES], filters=pc.field(schema.ROW).isin(rows))
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{url}: not a readable parquet file ({e})") from None
    return {r: b for r, b in zip(t.column(schema.ROW).to_pylist(), t.column(schema.IMAGE_BYTES).to_pylist()) if b}
