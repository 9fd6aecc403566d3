"""The per-shard work of a run, as plain functions and one actor class (Ray-free; the runner
decides where they execute and in what order: curate/runner.py ShardScheduler). An input shard is
the unit of accounting; its fetch and scoring go in windows of rows (score.window_rows, from the
layout), so scoring starts on a shard's first window while the rest is still being fetched, and
every actor can score a piece of one big shard:

  prepare_shard (CPU task)        read -> annotate text -> cheap text rules; the rows to fetch
                                  go to _work/<shard>/ (annotations.parquet, todo.parquet: one
                                  row group per window). A shard with nothing to fetch is
                                  finished here.
  fetch_window (CPU task)         fetches one window: w<k>.fetched.parquet (statuses) and
                                  w<k>.images.parquet (row, caption, stored jpg)
  ShardScorer.score_window        CLIP-scores one fetched window: [w<k>.embeddings.parquet,]
  (actor, GPU if any)             w<k>.scores.parquet
  finish_windows (CPU task)       every window in: images/, [embeddings/,] annotations/<shard>.parquet,
                                  then annotations/<shard>.done; _work/<shard>/ removed

Every output has a deterministic name, so a step that Ray runs twice writes the same bytes twice,
never two copies; a killed run leaves _work/<shard>/, which the next run's prepare_shard discards
and redoes. A rerun with a looser spec re-opens finished shards and fetches/scores only the rows
that the earlier, stricter spec skipped.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import accounting, annotations, datacomp_embeddings, deletions, faults, forget, io, schema, store
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
    """Read, annotate and apply the text rules to one shard. Returns {"shard", "state", ...}:
    "done" (finished here: nothing to fetch), "unchanged" (a finished shard this spec adds nothing
    to), or "fetch" with "windows" (how many fetch_window calls its rows to fetch were cut into)
    and "counts" (for finish_windows)."""
    spec = PipelineSpec.model_validate_json(spec_json)
    shard = shard_name(path)
    t0 = time.time()
    store.discard_in_flight(run_dir, shard)  # what a killed run left of this shard: redone from here
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
            status = FetchStatus.NOT_ATTEMPTED.value
        else:
            todo = pl.Series([False] * ann.height, dtype=pl.Boolean)  # typed: a 0-row shard sums to 0, not None
            status = FetchStatus.NOT_NEEDED.value
        ann = ann.with_columns(pl.lit(status).alias(schema.FETCH_STATUS))
        # every annotation column from here on (fetch and score fill theirs in)
        ann = pl.from_arrow(annotations.conform(ann.to_arrow(), spec.input.keep_columns))
        if spec.input.embeddings is not None:  # DataComp's <shard>.npz: row alignment checked, before the marker
            rows = ann.get_column(schema.ROW).to_numpy()
            emb = datacomp_embeddings.shard_embeddings(path, spec.input, rows)
            io.write_parquet(annotations.embeddings_path(run_dir, shard), emb)

    n_fetch = int(todo.sum())
    counts = {"rows": ann.height, **carried, "fetch_attempted": n_fetch, "fetch_ok": 0}
    if not n_fetch:
        counts["prepare_s"] = round(time.time() - t0, 3)
        finish_shard(run_dir, shard, ann, spec.input.keep_columns, counts)
        return {"shard": shard, "state": "done", **counts}
    # the rows to fetch wait in _work/<shard>/ as "pending", in windows of window_rows rows: each
    # window is fetched by its own task and scored by its own call as soon as it is fetched
    ann = ann.with_columns(
        pl.when(todo).then(pl.lit(PENDING)).otherwise(pl.col(schema.FETCH_STATUS)).alias(schema.FETCH_STATUS)
    )
    rows = ann.filter(todo).select(schema.ROW, schema.URL, schema.CAPTION, schema.EXPECTED_SHA256).to_arrow()
    window = spec.score.window_rows or n_fetch
    io.write_parquet(work_path(run_dir, shard), ann.to_arrow())
    io.write_parquet(store.work_todo_path(run_dir, shard), rows, row_group_size=window)
    counts["prepare_s"] = round(time.time() - t0, 3)
    windows = -(-n_fetch // window)
    return {"shard": shard, "state": "fetch", "windows": windows, "counts": counts, **counts}


def fetch_window(run_dir: str, shard: str, window: int, spec_json: str) -> dict:
    """Fetch window `window` of a prepared shard's rows (one row group of its todo file). Writes the
    window's statuses and its stored images (with their captions, for the scorer). Returns
    {"window", "fetched", "ok", "fetch_s"}. Repeating it rewrites the same two files."""
    spec = PipelineSpec.model_validate_json(spec_json)
    t0 = time.time()
    rows = io.read_row_group(store.work_todo_path(run_dir, shard), window)
    fetched = FETCH(rows, spec, shard)
    if fetched.num_rows != rows.num_rows:
        raise RuntimeError(f"shard {shard}: fetch returned {fetched.num_rows} statuses for {rows.num_rows} rows")
    got = fetched.filter(pc.is_valid(fetched.column(schema.IMAGE_BYTES))).select([schema.ROW, schema.IMAGE_BYTES])
    images = got.join(rows.select([schema.ROW, schema.CAPTION]), schema.ROW).sort_by(schema.ROW)
    io.write_parquet(store.window_path(run_dir, shard, window, "images"), images, stored_columns=[schema.IMAGE_BYTES])
    # last: a window with its statuses written is fetched
    io.write_parquet(store.window_path(run_dir, shard, window, "fetched"), fetched.drop_columns([schema.IMAGE_BYTES]))
    return {"window": window, "fetched": rows.num_rows, "ok": got.num_rows, "fetch_s": round(time.time() - t0, 3)}


def finish_windows(run_dir: str, shard: str, spec_json: str, windows: int, counts: dict) -> dict:
    """Once every window of a shard is fetched (and scored, when the spec scores): its statuses,
    images, scores and embeddings go into the shard's files, then its annotation file and marker
    (finish_shard). `counts`: prepare's, with the windows' fetch and score figures added."""
    spec = PipelineSpec.model_validate_json(spec_json)
    ann = pl.from_arrow(io.read_parquet(work_path(run_dir, shard)))
    fetched = _windows(run_dir, shard, range(windows), "fetched")
    # fetched sizes replace input metadata only where the fetch produced them (nulls do not overwrite)
    ann = ann.update(pl.from_arrow(fetched), on=schema.ROW, how="left", include_nulls=False)
    parts = [io.read_parquet(store.window_path(run_dir, shard, w, "images")) for w in range(windows)]
    with_images = [w for w, t in enumerate(parts) if t.num_rows]  # only these were scored
    images = pa.concat_tables(parts).select([schema.ROW, schema.IMAGE_BYTES])
    scored_now = None
    if spec.score.source == "model" and with_images:
        scores = pl.from_arrow(_windows(run_dir, shard, with_images, "scores"))
        if scores.height != images.num_rows:
            raise RuntimeError(
                f"shard {shard}: {images.num_rows} fetched images but {scores.height} scores in "
                f"{store.work_shard_dir(run_dir, shard)}"
            )
        ann = ann.update(scores, on=schema.ROW, how="left", include_nulls=False)
        scored_now = int(scores.get_column(schema.CLIP_SCORE).is_not_null().sum())
    ann, images, k = deletions.drop_fetched(ann, images, deletions.load_keys(run_dir))
    counts = {**counts, "forgotten": counts["forgotten"] + k, "fetch_ok": images.num_rows, "windows": windows}
    if scored_now is not None:
        counts["scored_now"] = scored_now
    _merge_images(run_dir, shard, images)
    if spec.score.store_embeddings and spec.score.source == "model" and with_images:
        emb = _windows(run_dir, shard, with_images, "embeddings")
        kept = pc.is_in(emb.column(schema.ROW), value_set=ann.get_column(schema.ROW).to_arrow())
        _merge_by_row(annotations.embeddings_path(run_dir, shard), emb.filter(kept))
    counts = {**counts, "rows": ann.height}
    finish_shard(run_dir, shard, ann, spec.input.keep_columns, counts)
    return {"shard": shard, "state": "done", **counts}


def _windows(run_dir: str, shard: str, which: Iterable[int], kind: str) -> pa.Table:
    """The `kind` files of the shard's windows `which`, concatenated; a missing one is an error
    naming it (a window whose fetch stored no image has no scores or embeddings file: the caller
    leaves it out of `which`)."""
    parts = []
    for w in which:
        p = store.window_path(run_dir, shard, w, kind)
        if not io.exists(p):
            raise RuntimeError(f"shard {shard}: window {w} has no {p}")
        parts.append(io.read_parquet(p))
    return pa.concat_tables(parts)


def _merge_images(run_dir: str, shard: str, images: pa.Table) -> None:
    _merge_by_row(images_path(run_dir, shard), images, stored_columns=[schema.IMAGE_BYTES])


def _merge_by_row(path: str, table: pa.Table, stored_columns: Iterable[str] = ()) -> None:
    """Write a per-shard side file (images/, embeddings/) keyed by row; a rerun that fetches or
    scores more rows of a finished shard merges into the file already there (new rows win)."""
    if io.exists(path):
        old = io.read_parquet(path)
        keep = pa.compute.invert(pa.compute.is_in(old.column(schema.ROW), value_set=table.column(schema.ROW)))
        for f in table.schema:  # a column newer than the file (e.g. image_phash): null for old rows
            if f.name not in old.schema.names:
                old = old.append_column(f, pa.nulls(old.num_rows, f.type))
        table = pa.concat_tables([old.filter(keep), table.select(old.schema.names).cast(old.schema)])
    rows = table.column(schema.ROW)
    if len(rows) > 1 and not pc.all(pc.less(rows.slice(0, len(rows) - 1), rows.slice(1))).as_py():
        table = table.sort_by(schema.ROW)  # (windows come in row order: then this copy is not needed)
    io.write_parquet(path, table, stored_columns=stored_columns)


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
    store.discard_in_flight(run_dir, shard)  # the shard is no longer in flight


def embeddings_table(rows: np.ndarray, emb: np.ndarray, phash: np.ndarray) -> pa.Table:
    """embeddings/<shard>.parquet's rows: row int64, image_embedding list<float16>, image_phash uint64."""
    d = emb.shape[1] if emb.ndim == 2 else 0
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float16).reshape(-1), type=pa.float16())
    offsets = pa.array(np.arange(0, (len(rows) + 1) * d, d, dtype=np.int32)[: len(rows) + 1], type=pa.int32())
    return pa.table(
        {
            schema.ROW: pa.array(np.asarray(rows, dtype=np.int64)),
            schema.IMAGE_EMBEDDING: pa.ListArray.from_arrays(offsets, values),
            schema.IMAGE_PHASH: pa.array(np.asarray(phash, dtype=np.uint64), pa.uint64()),
        }
    )


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

    def score_window(self, run_dir: str, shard: str, window: int) -> dict:
        """CLIP-score the images of one fetched window of a shard; writes the window's scores (and
        embeddings with score.store_embeddings). Returns {"window", "scored", "score_s"}. A call
        that finds the window's scores already written (Ray retried it after the actor died past
        that point) returns what they say and writes nothing."""
        t0 = time.time()
        out = store.window_path(run_dir, shard, window, "scores")
        if io.exists(out):
            done = io.read_parquet(out, columns=[schema.CLIP_SCORE])
            return {
                "window": window,
                "scored": done.num_rows - done.column(0).null_count,
                "score_s": 0.0,
                "reused": True,
            }
        todo = io.read_parquet(store.window_path(run_dir, shard, window, "images"))
        # the tokenizer truncates to its context length anyway; cutting first keeps a 1 MB caption cheap
        captions = [
            c[: self.spec.input.max_caption_chars] if c is not None else ""
            for c in todo.column(schema.CAPTION).to_pylist()
        ]
        image_bytes = todo.column(schema.IMAGE_BYTES).to_pylist()
        if self.spec.score.store_embeddings:
            scores, emb, phash = self.scorer.score_for_dedup(image_bytes, captions)
        else:
            scores, emb, phash = self.scorer.score(image_bytes, captions), None, None
        scores = np.asarray(scores, dtype=np.float32)
        faults.fire("score_first_batch", shard)  # test hook (curate/faults.py); nothing written yet
        faults.fire("score_poison", shard)
        bad = np.isnan(scores)
        rows = todo.column(schema.ROW).to_numpy()
        if emb is not None:  # before the scores: a window with its scores written is scored
            io.write_parquet(
                store.window_path(run_dir, shard, window, "embeddings"),
                embeddings_table(rows[~bad], emb[~bad], phash[~bad]),
            )
        n = len(rows)
        table = pa.table(
            {
                schema.ROW: pa.array(rows, pa.int64()),
                schema.CLIP_SCORE: pa.array(scores, pa.float32(), mask=bad),
                schema.CLIP_MODEL: pa.array([self.scorer.model_id] * n, pa.string()),
                schema.FETCH_STATUS: pa.array(
                    [FetchStatus.DECODE_FAILED.value if b else FetchStatus.OK.value for b in bad], pa.string()
                ),
                schema.FETCH_ERROR: pa.array(
                    ["image could not be decoded for scoring" if b else None for b in bad], pa.string()
                ),
            }
        )
        io.write_parquet(out, table)
        faults.fire("score_after_write", shard)  # test hook: a retry must find the window scored
        return {"window": window, "scored": int((~bad).sum()), "score_s": round(time.time() - t0, 3)}
