"""The per-shard work of a run, as plain functions and one actor class (Ray-free; the runner
decides where they execute). One input shard is the unit of work throughout:

  prepare_shard (CPU task)   read -> annotate text -> cheap text rules -> fetch survivors
                             writes _work/<shard>.parquet (+ images/<shard>.parquet)
  ShardScorer.score_shard    CLIP-scores fetched rows that have no score yet
  (actor, GPU if any)        writes [embeddings/<shard>.parquet if score.store_embeddings,]
                             annotations/<shard>.parquet, then annotations/<shard>.done

A shard that needs no scoring is finished by prepare_shard itself. Every output has a
deterministic name, so a task that Ray runs twice writes the same bytes twice, never two copies.
A rerun with a looser spec re-opens finished shards and fetches/scores only the rows that the
earlier, stricter spec skipped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import accounting, annotations, deletions, faults, forget, io, schema, store
from curate.config import PipelineSpec, ScoreConfig
from curate.filters.rules import text_rules_mask
from curate.schema import FetchStatus
from curate.stages.annotate import ANNOTATE, CAPTION_LSH
from curate.stages.base import Stage
from curate.stages.fetch import FETCH, TRANSIENT
from curate.stages.read import read_shard, shard_name
from curate.manifest import describe_transform

log = logging.getLogger(__name__)

PENDING = "pending"  # internal, never written to a finished annotation shard


def work_path(run_dir: str, shard: str) -> str:
    return store.work_path(run_dir, shard)


def images_path(run_dir: str, shard: str) -> str:
    return store.images_path(run_dir, shard)


def prepare_shard(path: str, spec_json: str, run_dir: str) -> dict:
    """Returns {"shard", "state": "done" | "needs_scoring" | "unchanged", counts...}."""
    spec = PipelineSpec.model_validate_json(spec_json)
    shard = shard_name(path)
    t0 = time.time()
    done = io.exists(annotations.marker_path(run_dir, shard))
    keys = deletions.load_keys(run_dir)  # `curate forget` requests: those rows never come back

    if done:
        if keys:
            forget.clean_shard(run_dir, shard, keys)
        carried = accounting.marker_counts(run_dir, shard)
        ann = pl.from_arrow(io.read_parquet(annotations.shard_path(run_dir, shard)))
        if not spec.needs_images:
            return {"shard": shard, "state": "unchanged", "rows": ann.height}
        # rows a stricter spec skipped and that pass the text rules now, and rows whose fetch
        # failed transiently (timeouts, 5xx, 429, ...): nothing else is fetched again
        skipped = pl.col(schema.FETCH_STATUS) == FetchStatus.NOT_ATTEMPTED.value
        transient = pl.col(schema.FETCH_STATUS).is_in([s.value for s in TRANSIENT])
        todo = text_rules_mask(ann, spec.selection, where=skipped | transient)
        if not todo.any():
            return {"shard": shard, "state": "unchanged", "rows": ann.height}
    else:
        extra = (spec.score.column,) if spec.score.source == "column" and spec.score.column else ()
        table, carried = deletions.drop_at_read(read_shard(path, spec.input, extra_columns=extra), keys)
        ann = pl.from_arrow(CAPTION_LSH(ANNOTATE(table, spec, shard), spec, shard))
        if spec.score.source == "column":
            ann = ann.with_columns(
                pl.col(spec.score.column).cast(pl.Float32).alias(schema.CLIP_SCORE),
                pl.lit(f"input-column:{spec.score.column}").alias(schema.CLIP_MODEL),
            )
        if spec.needs_images:
            todo = text_rules_mask(ann, spec.selection)  # one value per row, whatever rules are on
            ann = ann.with_columns(
                pl.when(todo)
                .then(pl.lit(PENDING))
                .otherwise(pl.lit(FetchStatus.NOT_ATTEMPTED.value))
                .alias(schema.FETCH_STATUS)
            )
        else:
            todo = pl.Series([False] * ann.height, dtype=pl.Boolean)  # typed: a 0-row shard sums to 0, not None
            ann = ann.with_columns(pl.lit(FetchStatus.NOT_NEEDED.value).alias(schema.FETCH_STATUS))
        # every annotation column from here on (fetch and score fill theirs in)
        ann = pl.from_arrow(annotations.conform(ann.to_arrow(), spec.input.keep_columns))

    fetched_ok = 0
    n_fetch = int(todo.sum())
    if n_fetch:
        rows = ann.filter(todo).select(schema.ROW, schema.URL, schema.CAPTION, schema.EXPECTED_SHA256).to_arrow()
        ann, images = _fetch_into(ann, rows, spec, run_dir, shard)
        ann, images, k = deletions.drop_fetched(ann, images, keys)
        carried["forgotten"] += k
        fetched_ok = images.num_rows
        _merge_images(run_dir, shard, images)

    counts = {
        "rows": ann.height,
        **carried,
        "fetch_attempted": n_fetch,
        "fetch_ok": fetched_ok,
        "prepare_s": round(time.time() - t0, 3),
    }
    needs_scoring = (
        spec.score.source == "model"
        and ann.select((pl.col(schema.FETCH_STATUS) == FetchStatus.OK.value) & pl.col(schema.CLIP_SCORE).is_null())
        .to_series()
        .any()
    )
    if needs_scoring:
        io.write_parquet(work_path(run_dir, shard), ann.to_arrow())
        return {"shard": shard, "state": "needs_scoring", "counts": counts, **counts}
    finish_shard(run_dir, shard, ann, spec.input.keep_columns, counts)
    return {"shard": shard, "state": "done", **counts}


def _fetch_into(
    ann: pl.DataFrame, rows: pa.Table, spec: PipelineSpec, run_dir: str, shard: str
) -> tuple[pl.DataFrame, pa.Table]:
    fetched = FETCH(rows, spec, shard)
    if fetched.num_rows != rows.num_rows:
        raise RuntimeError(f"shard {shard}: fetch returned {fetched.num_rows} statuses for {rows.num_rows} rows")
    ok = pc.is_valid(fetched.column(schema.IMAGE_BYTES))
    images = fetched.filter(ok).select([schema.ROW, schema.IMAGE_BYTES])
    st = pl.from_arrow(fetched.drop_columns([schema.IMAGE_BYTES]))
    # fetched sizes replace input metadata only where the fetch produced them (nulls do not overwrite)
    ann = ann.update(st, on=schema.ROW, how="left", include_nulls=False)
    return ann, images


def _merge_images(run_dir: str, shard: str, images: pa.Table) -> None:
    _merge_by_row(images_path(run_dir, shard), images)


def _merge_by_row(path: str, table: pa.Table) -> None:
    """Write a per-shard side file (images/, embeddings/) keyed by row; a rerun that fetches or
    scores more rows of a finished shard merges into the file already there (new rows win)."""
    if io.exists(path):
        old = io.read_parquet(path)
        keep = pa.compute.invert(pa.compute.is_in(old.column(schema.ROW), value_set=table.column(schema.ROW)))
        for f in table.schema:  # a column newer than the file (e.g. image_phash): null for old rows
            if f.name not in old.schema.names:
                old = old.append_column(f, pa.nulls(old.num_rows, f.type))
        table = pa.concat_tables([old.filter(keep), table.select(old.schema.names).cast(old.schema)])
    io.write_parquet(path, table.sort_by(schema.ROW))


def finish_shard(run_dir: str, shard: str, ann: pl.DataFrame, keep_columns: list[str], counts: dict) -> None:
    """Write the shard's annotation file, then its completion marker (a ShardMarker: the file's
    own counts, the prepare/score `counts` and the time). The counts are checked before anything
    is written: an unknown or mistyped key fails here, not as a silent 0 in a later report."""
    if (ann.get_column(schema.FETCH_STATUS) == PENDING).any():
        raise RuntimeError(f"shard {shard}: rows left in an internal 'pending' fetch state")
    table = annotations.conform(ann.sort(schema.ROW).to_arrow(), keep_columns)
    marker = accounting.finished_marker(run_dir, shard, table, counts)
    io.write_parquet(annotations.shard_path(run_dir, shard), table)
    store.write_marker(run_dir, marker)  # last: the completion marker
    io.remove(work_path(run_dir, shard))


def _merge_embeddings(run_dir: str, shard: str, rows: np.ndarray, emb: np.ndarray, phash: np.ndarray) -> None:
    """embeddings/<shard>.parquet: row int64, image_embedding list<float16>, image_phash uint64,
    sorted by row."""
    d = emb.shape[1] if emb.ndim == 2 else 0
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float16).reshape(-1), type=pa.float16())
    offsets = pa.array(np.arange(0, (len(rows) + 1) * d, d, dtype=np.int32)[: len(rows) + 1], type=pa.int32())
    table = pa.table(
        {
            schema.ROW: pa.array(np.asarray(rows, dtype=np.int64)),
            schema.IMAGE_EMBEDDING: pa.ListArray.from_arrays(offsets, values),
            schema.IMAGE_PHASH: pa.array(np.asarray(phash, dtype=np.uint64), pa.uint64()),
        }
    )
    _merge_by_row(annotations.embeddings_path(run_dir, shard), table)


def _clip_scorer(cfg: ScoreConfig) -> Any:
    """The score stage's per-worker state: a ClipScorer (the model, loaded once), which maps a
    table with `caption` and `jpg` to the same table + `clip_score` (curate/stages/score.py)."""
    # lazy: stages.score imports torch and open_clip (seconds); only a scoring actor needs it, not prepare tasks
    from curate.stages.score import ClipScorer

    return ClipScorer(cfg)


# stateful: `fn` builds the worker's scorer from the score section, once per actor
SCORE = Stage("score", ("score",), _clip_scorer, cpus=1, wants_gpu=True)
# the stages one prepare task runs, one shard after another: its resources are theirs
PREPARE_STAGES = (ANNOTATE, CAPTION_LSH, FETCH)


class ShardScorer:
    """Loads the CLIP model once; scores whole shards. Runs as an actor of the run's executor
    (curate/executor.py: a Ray actor, or a plain instance in-process); curate/runner.py declares
    its resources (`scorer_resources`)."""

    def __init__(self, spec_json: str):
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.scorer = SCORE.fn(self.spec.score)

    def describe(self) -> dict:
        loaded = self.scorer.clip
        return {
            "model_id": self.scorer.model_id,
            "model": loaded.model_name,
            "pretrained": loaded.pretrained,
            "checkpoint_sha256": loaded.checkpoint_sha256,
            "device": str(loaded.device),
            "precision": loaded.precision,
            "preprocess": describe_transform(loaded.preprocess, getattr(loaded.model, "visual", None)),
        }

    def score_shard(self, run_dir: str, shard: str, prepare_counts: dict | None = None) -> dict:
        t0 = time.time()
        if not io.exists(work_path(run_dir, shard)) and io.exists(annotations.marker_path(run_dir, shard)):
            # a retried call (the actor died after finishing it, before its answer reached the
            # driver): the shard is done, its marker says with what
            return {**store.read_marker(run_dir, shard).to_json(), "state": "done"}
        ann = pl.from_arrow(io.read_parquet(work_path(run_dir, shard)))
        todo = ann.filter((pl.col(schema.FETCH_STATUS) == FetchStatus.OK.value) & pl.col(schema.CLIP_SCORE).is_null())
        imgs = pl.from_arrow(io.read_parquet(images_path(run_dir, shard)))
        todo = todo.select(schema.ROW, schema.CAPTION).join(imgs, on=schema.ROW, how="left")
        missing = todo.get_column(schema.IMAGE_BYTES).is_null()
        if missing.any():
            raise RuntimeError(
                f"shard {shard}: {int(missing.sum())} fetched rows have no stored image in {images_path(run_dir, shard)}"
            )
        # the tokenizer truncates to its context length anyway; cutting first keeps a 1 MB caption cheap
        captions = (
            todo.get_column(schema.CAPTION).fill_null("").str.slice(0, self.spec.input.max_caption_chars).to_list()
        )
        image_bytes = todo.get_column(schema.IMAGE_BYTES).to_list()
        if self.spec.score.store_embeddings:
            scores, emb, phash = self.scorer.score_for_dedup(image_bytes, captions)
        else:
            scores, emb, phash = self.scorer.score(image_bytes, captions), None, None
        scores = np.asarray(scores, dtype=np.float32)
        faults.fire("score_first_batch", shard)  # test hook (curate/faults.py); nothing written yet
        faults.fire("score_poison", shard)
        bad = np.isnan(scores)
        if emb is not None:  # before finish_shard: the annotation marker stays the last write
            _merge_embeddings(run_dir, shard, todo.get_column(schema.ROW).to_numpy()[~bad], emb[~bad], phash[~bad])
        upd = pl.DataFrame(
            {
                schema.ROW: todo.get_column(schema.ROW),
                schema.CLIP_SCORE: pl.Series(np.where(bad, None, scores).tolist(), dtype=pl.Float32),
                schema.CLIP_MODEL: pl.Series([self.scorer.model_id] * todo.height, dtype=pl.String),
                schema.FETCH_STATUS: pl.Series(
                    [FetchStatus.DECODE_FAILED.value if b else FetchStatus.OK.value for b in bad], dtype=pl.String
                ),
                schema.FETCH_ERROR: pl.Series(
                    ["image could not be decoded for scoring" if b else None for b in bad], dtype=pl.String
                ),
            }
        )
        ann = ann.update(upd, on=schema.ROW, how="left", include_nulls=False)
        counts = {**(prepare_counts or {}), "scored_now": int((~bad).sum()), "score_s": round(time.time() - t0, 3)}
        finish_shard(run_dir, shard, ann, self.spec.input.keep_columns, counts)
        faults.fire("score_after_marker", shard)  # test hook: a retry must find the shard done
        return {"shard": shard, "state": "done", **counts}
