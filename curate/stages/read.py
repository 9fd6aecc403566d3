"""Read stage: one input parquet shard -> the canonical row table.

Canonical columns: shard, row, uid, url, caption, then optional metadata the rules can use
(original_width/height, an input similarity column, sha256) and the spec's keep_columns.

With input.format = "webdataset" an input shard is a pool tar (NNNNN.tar) and its rows are those
of the parquet img2dataset wrote beside it (curate/webdataset_input.py): url, caption and, when
the pool kept one, uid; the images and statuses come in the fetch stage.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import io, schema, webdataset_input
from curate.annotations import FIELDS
from curate.config import InputConfig


class ShardReadError(RuntimeError):
    """An input shard that cannot be used; the message names the file (and the column)."""


@dataclass(frozen=True)
class Layout:
    name: str
    url: str
    caption: str
    uid: str | None
    # input column -> canonical column, for metadata the rules understand
    metadata: tuple[tuple[str, str], ...] = ()


# img2dataset's per-tar parquet: its own url and caption columns; uid when the pool kept one (DataComp)
POOL = Layout("webdataset", webdataset_input.URL, webdataset_input.CAPTION, webdataset_input.UID)

LAYOUTS = {
    # LAION metadata shards: URL, TEXT, WIDTH, HEIGHT, similarity, ...
    "laion": Layout(
        "laion", "URL", "TEXT", None, (("WIDTH", schema.ORIGINAL_WIDTH), ("HEIGHT", schema.ORIGINAL_HEIGHT))
    ),
    # DataComp CommonPool metadata: uid, url, text, original_width, original_height, sha256, clip_*_similarity_score
    "datacomp": Layout(
        "datacomp",
        "url",
        "text",
        "uid",
        (
            ("original_width", schema.ORIGINAL_WIDTH),
            ("original_height", schema.ORIGINAL_HEIGHT),
            ("sha256", schema.EXPECTED_SHA256),
        ),
    ),
}


def shard_name(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    for suffix in (".parquet", ".tar"):  # a metadata shard, or a pool tar (input.format = "webdataset")
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def list_shards(cfg: InputConfig) -> list[str]:
    paths: list[str] = []
    for p in cfg.paths:
        if cfg.format == "webdataset":
            try:
                found = webdataset_input.list_pool(p)
            except webdataset_input.PoolError as e:
                raise ShardReadError(str(e)) from e
        else:
            found = io.list_files(p)
        if not found:
            raise ShardReadError(f"{p}: no parquet files found")
        paths.extend(found)
    paths = sorted(set(paths))
    names: dict[str, str] = {}
    for p in paths:
        n = shard_name(p)
        if not n or n.startswith(".") or "\x00" in n:  # outputs are named <shard>.parquet, <shard>.done
            raise ShardReadError(
                f"{p}: an input shard's name must not be empty or start with '.' (it names its output files)"
            )
        if n in names:
            raise ShardReadError(
                f"two input shards share the name {n!r}: {names[n]} and {p}; outputs are named by shard"
            )
        names[n] = p
    return paths


def resolve_layout(cfg: InputConfig, columns: list[str], path: str) -> Layout:
    if cfg.layout == "custom" or cfg.url_column or cfg.caption_column:
        base = LAYOUTS.get(cfg.layout) if cfg.layout in LAYOUTS else None
        url = cfg.url_column or (base.url if base else None)
        cap = cfg.caption_column or (base.caption if base else None)
        if not url or not cap:
            raise ShardReadError(f"{path}: layout 'custom' needs input.url_column and input.caption_column")
        return Layout("custom", url, cap, cfg.uid_column, base.metadata if base else ())
    if cfg.layout in LAYOUTS:
        layout = LAYOUTS[cfg.layout]
    elif "URL" in columns and "TEXT" in columns:
        layout = LAYOUTS["laion"]
    elif "url" in columns and "text" in columns:
        layout = LAYOUTS["datacomp"]
    else:
        raise ShardReadError(
            f"{path}: cannot tell the layout: expected columns URL/TEXT (LAION) or url/text (DataComp); "
            f"found {columns}. Set input.layout or input.url_column/caption_column."
        )
    if cfg.uid_column:
        layout = Layout(layout.name, layout.url, layout.caption, cfg.uid_column, layout.metadata)
    elif layout.uid and layout.uid not in columns:
        layout = Layout(layout.name, layout.url, layout.caption, None, layout.metadata)
    return layout


def compute_uids(urls: list[str | None], captions: list[str | None]) -> list[str]:
    """DataComp-style 128-bit uid as 32 hex chars: md5 over url, a NUL, and the caption."""
    out = []
    for u, c in zip(urls, captions):
        h = hashlib.md5((u or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update((c or "").encode("utf-8", "surrogatepass"))
        out.append(h.hexdigest())
    return out


def footer_rows(path: str) -> int | str:
    """Rows in a parquet file by its footer, without reading data pages (a shard whose pages are
    corrupt still says how many rows it holds); "unknown" when the footer is unreadable too. For a
    pool tar, the rows of the parquet beside it."""
    if path.endswith(".tar"):
        path = webdataset_input.parquet_path(path)
    try:
        fs, p = io.fs_and_path(path)
        with fs.open(p, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    except Exception:  # noqa: BLE001 - any unreadable footer is "unknown", never a second failure
        return "unknown"


def pool_layout(cfg: InputConfig, columns: list[str]) -> Layout:
    """The layout of a pool's per-tar parquet: input.uid_column, else its uid column when it has one
    (a DataComp pool), else none (uid = md5(url \x00 caption), as for a metadata shard)."""
    uid = cfg.uid_column or (POOL.uid if POOL.uid in columns else None)
    return Layout(POOL.name, POOL.url, POOL.caption, uid)


def read_shard(path: str, cfg: InputConfig, extra_columns: tuple[str, ...] = ()) -> pa.Table:
    """Read one shard into canonical columns. `extra_columns` are input columns a later stage needs
    (e.g. the similarity column a spec selects on); they must exist. A pool tar (input.format =
    "webdataset") is read from the parquet beside it, whose key and status columns are checked."""
    pool = cfg.format == "webdataset"
    source = webdataset_input.parquet_path(path) if pool else path  # the file the columns are in
    try:
        fs, p = io.fs_and_path(source)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            columns = pf.schema_arrow.names
            layout = pool_layout(cfg, columns) if pool else resolve_layout(cfg, columns, source)
            wanted = [layout.url, layout.caption]
            if layout.uid:
                wanted.append(layout.uid)
            checked = [webdataset_input.KEY, webdataset_input.STATUS] if pool else []
            meta_cols = [src for src, _ in layout.metadata if src in columns]
            for col in [*extra_columns, *cfg.keep_columns]:
                if col not in columns:
                    raise ShardReadError(
                        f"{source}: missing column {col!r} (named in the spec); columns present: {columns}"
                    )
            for col in [*wanted, *checked]:
                if col not in columns:
                    raise ShardReadError(
                        f"{source}: missing column {col!r} (layout {layout.name}); columns present: {columns}"
                    )
            read_cols = list(dict.fromkeys([*wanted, *checked, *meta_cols, *extra_columns, *cfg.keep_columns]))
            table = pf.read(columns=read_cols)
    except ShardReadError:
        raise
    except FileNotFoundError as e:
        if pool:
            raise ShardReadError(
                f"{path}: no parquet beside this tar (expected {source}, as img2dataset writes it): {e}"
            ) from e
        raise ShardReadError(f"{path}: file not found ({e})") from e
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ShardReadError(f"{source}: not a readable parquet file: {type(e).__name__}: {e}") from e

    table = _decode_dictionaries(table)
    _check_utf8(table, source)
    if pool:
        problem = webdataset_input.pool_problem(table)
        if problem:
            raise ShardReadError(f"{source}: {problem}")
    n = table.num_rows
    url = _as_string(table.column(layout.url), source, layout.url)
    caption = _as_string(table.column(layout.caption), source, layout.caption)
    if layout.uid:
        uid = pc.utf8_lower(_as_string(table.column(layout.uid), source, layout.uid))
        if uid.null_count:
            raise ShardReadError(f"{source}: column {layout.uid!r} has {uid.null_count} null uids")
        _check_uids(uid, source, layout.uid)
    else:
        uid = pa.array(compute_uids(url.to_pylist(), caption.to_pylist()), pa.string())

    cols = {
        schema.SHARD: pa.array([shard_name(path)] * n, pa.string()),
        schema.ROW: pa.array(range(n), pa.int64()),
        schema.UID: uid,
        schema.URL: url,
        schema.CAPTION: caption,
    }
    for src, dst in layout.metadata:
        if src in table.column_names:
            target = FIELDS[dst].type  # the annotation table's type for the column
            try:
                cols[dst] = pc.cast(table.column(src), target, safe=False)
            except pa.ArrowInvalid as e:
                raise ShardReadError(f"{source}: column {src!r} cannot be read as {target}: {e}") from e
    for col in [*extra_columns, *cfg.keep_columns]:
        if col not in cols:
            cols[col] = table.column(col)
    return pa.table(cols)


def _decode_dictionaries(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (e.g. pandas categoricals written to parquet) as plain columns
    of their value type: every later stage reads them like any other column."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, pc.cast(table.column(i), f.type.value_type))
    return table


def _check_utf8(table: pa.Table, path: str) -> None:
    """Parquet does not guarantee that a string column holds valid UTF-8; a bad value would
    surface later as a bare UnicodeDecodeError. Fail here, naming the file and the column."""
    for f in table.schema:
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        col = table.column(f.name)
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        bad = []
        binary = pa.large_binary() if pa.types.is_large_string(f.type) else pa.binary()
        for row, value in enumerate(col.cast(binary).to_pylist()):
            if value is None:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((row, value))
        first = f", first at row {bad[0][0]}: {bad[0][1][:60]!r}" if bad else ""
        raise ShardReadError(f"{path}: column {f.name!r}: {len(bad) or 'some'} value(s) are not valid UTF-8{first}")


_UID_PATTERN = r"^[0-9a-f]{32}$"


def _check_uids(uid: pa.ChunkedArray, path: str, name: str) -> None:
    """Input uids must be DataComp's 32 hex characters (128 bits): uids.npy stores each as two
    uint64s, so anything else would fail only after part of a selection was written."""
    ok = pc.match_substring_regex(uid, _UID_PATTERN)
    n_bad = len(ok) - pc.sum(ok).as_py() if len(ok) else 0
    if n_bad:
        bad = pc.filter(uid, pc.invert(ok))
        first = pc.index(ok, False).as_py()
        raise ShardReadError(
            f"{path}: column {name!r}: {n_bad} value(s) are not 32-character hex uids, e.g. {bad[0].as_py()!r} "
            f"(row {first})"
        )


def _as_string(col: pa.ChunkedArray, path: str, name: str) -> pa.ChunkedArray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.cast(col, pa.string())
    if pa.types.is_null(col.type):
        return pc.cast(col, pa.string())
    raise ShardReadError(f"{path}: column {name!r} should hold text but has type {col.type}")
