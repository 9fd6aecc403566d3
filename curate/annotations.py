"""The annotation table: one row per input row, every annotation a column. It is the cache that
selection, reports and reruns read; nothing downstream touches the input, a model or the network.

Layout in a run directory: annotations/<shard>.parquet, written atomically, then
annotations/<shard>.done (a small JSON with the shard's counts) written last as its completion
marker. Readers trust only shards that have a marker.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from curate import deletions, io, schema, store

# Columns every annotation shard has, with their types; input keep_columns follow them.
ANNOTATION_FIELDS: list[pa.Field] = [
    pa.field(schema.SHARD, pa.string()),
    pa.field(schema.ROW, pa.int64()),
    pa.field(schema.UID, pa.string()),
    pa.field(schema.URL, pa.string()),
    pa.field(schema.CAPTION, pa.string()),
    pa.field(schema.LANGUAGE, pa.string()),
    pa.field(schema.LANGUAGE_SCORE, pa.float32()),
    pa.field(schema.CAPTION_CHARS, pa.int32()),
    pa.field(schema.CAPTION_WORDS, pa.int32()),
    pa.field(schema.DOMAIN, pa.string()),
    pa.field(schema.TLD, pa.string()),
    pa.field(schema.URL_NORMALIZED, pa.string()),
    pa.field(schema.FETCH_STATUS, pa.string()),
    pa.field(schema.FETCH_ERROR, pa.string()),
    pa.field(schema.WIDTH, pa.int32()),
    pa.field(schema.HEIGHT, pa.int32()),
    pa.field(schema.ORIGINAL_WIDTH, pa.int32()),
    pa.field(schema.ORIGINAL_HEIGHT, pa.int32()),
    pa.field(schema.IMAGE_SHA256, pa.string()),
    pa.field(schema.EXPECTED_SHA256, pa.string()),
    pa.field(schema.CLIP_SCORE, pa.float32()),
    pa.field(schema.CLIP_MODEL, pa.string()),
    pa.field(schema.CAPTION_LSH, pa.list_(pa.uint64())),  # null unless annotate.caption_minhash
    pa.field(schema.CAPTION_LSH_NGRAM, pa.int8()),  # with the keys: verification shingles the same way
]
ANNOTATION_COLUMNS = [f.name for f in ANNOTATION_FIELDS]
FIELDS: dict[str, pa.Field] = {f.name: f for f in ANNOTATION_FIELDS}  # the one place a column's type is written


def conform(table: pa.Table, keep_columns: list[str] = ()) -> pa.Table:
    """Order and type the annotation columns; add missing ones as nulls; keep the spec's extras."""
    n = table.num_rows
    cols, fields = [], []
    for f in ANNOTATION_FIELDS:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(n, f.type))
        fields.append(f)
    for name in keep_columns:
        if name not in ANNOTATION_COLUMNS:
            cols.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def shard_path(run_dir: str, shard: str) -> str:
    return store.annotation_path(run_dir, shard)


def marker_path(run_dir: str, shard: str) -> str:
    return store.marker_path(run_dir, shard)


def completed_shards(run_dir: str) -> list[str]:
    """Shards whose marker exists (marker is written after the data: only these are trusted)."""
    d = store.annotations_dir(run_dir)
    if not io.exists(d):
        return []
    return sorted(p.rsplit("/", 1)[-1][: -len(".done")] for p in io.list_files(d, suffix=".done"))


def scan(run_dir: str, shards: list[str] | None = None, include_forgotten: bool = False) -> pl.LazyFrame:
    """Lazily scan completed annotation shards (or the named ones). Rows a `curate forget` key
    matches by uid or image sha256 are left out (curate/deletions.py; none remain after it ran)."""
    shards = completed_shards(run_dir) if shards is None else shards
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no completed annotation shards (annotations/*.done)")
    lf = pl.scan_parquet([shard_path(run_dir, s) for s in shards])
    if not include_forgotten:
        keys = deletions.load_keys(run_dir)
        if keys:
            lf = lf.filter(deletions.exclude_expr(keys, lf.collect_schema().names()).not_())
    return lf


# --- image embeddings (score.store_embeddings): embeddings/<shard>.parquet, columns row, image_embedding
def embeddings_path(run_dir: str, shard: str) -> str:
    return store.embeddings_path(run_dir, shard)


def embeddings_for(run_dir: str, sel, shards: list[str] | None = None) -> pl.LazyFrame | None:
    """What decide() needs as `embeddings=` for selection `sel`: the run's stored embeddings when
    sel.dedup.image_cosine is on (a clear error when the run stored none), else None."""
    if sel.dedup.image_cosine is None:
        return None
    emb = scan_embeddings(run_dir, shards)
    if emb is None:
        raise no_embeddings(run_dir)
    return emb


def no_embeddings(run_dir: str) -> ValueError:
    """The error of a selection with dedup.image_cosine on a run that stored no embeddings."""
    return ValueError(
        f"{run_dir}: dedup.image_cosine needs image embeddings, but the run has no "
        "embeddings/<shard>.parquet; rerun with score.store_embeddings = true"
    )


def scan_embeddings(run_dir: str, shards: list[str] | None = None) -> pl.LazyFrame | None:
    """(shard, row, image_embedding, image_phash) of the completed shards that have an embeddings
    file; None when none has one (the run was made without score.store_embeddings). image_phash
    is null in files written before perceptual hashes were stored."""
    shards = completed_shards(run_dir) if shards is None else shards
    frames = []
    for s in shards:
        p = embeddings_path(run_dir, s)
        if not io.exists(p):
            continue
        lf = pl.scan_parquet(p)
        has_phash = schema.IMAGE_PHASH in lf.collect_schema().names()
        frames.append(
            lf.select(
                pl.lit(s).alias(schema.SHARD),
                pl.col(schema.ROW),
                pl.col(schema.IMAGE_EMBEDDING),
                pl.col(schema.IMAGE_PHASH) if has_phash else pl.lit(None, pl.UInt64).alias(schema.IMAGE_PHASH),
            )
        )
    return pl.concat(frames) if frames else None
