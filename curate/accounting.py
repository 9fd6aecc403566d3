"""Run accounting, in one place: what a completion marker counts from its annotation file, the
run totals the manifest records, and kept + removed + forgotten == rows read, per shard and in
total, from the completion markers (rows_read, forgotten) and the selection's own counts.
Markers are read through curate/store.py as typed records (curate/records.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, TypeVar

import polars as pl
import pyarrow as pa

from curate import annotations, schema, store
from curate.deletions import exclude_expr, load_keys
from curate.records import Manifest, RunTotals, ShardMarker

_T = TypeVar("_T")


def _per_shard(read: Callable[[str, str], _T], run_dir: str, shards: list[str]) -> dict[str, _T]:
    """{shard: read(run_dir, shard)} in the order of `shards`, read in parallel (one small
    request each on a bucket)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(shards, pool.map(lambda s: read(run_dir, s), shards)))


def shard_rows(run_dir: str, shards: list[str]) -> dict[str, int]:
    """{shard: rows in its annotation file}, from the completion markers (no data file is read)."""
    return {s: mk.rows for s, mk in _per_shard(store.read_marker, run_dir, shards).items()}


def annotation_counts(final: pl.DataFrame) -> dict[str, Any]:
    """What a completion marker counts from its shard's annotation file (which must hold
    fetch_status and clip_score): rows, scored, fetch_status."""
    return {
        "rows": final.height,
        "scored": int(final.get_column(schema.CLIP_SCORE).is_not_null().sum()),
        "fetch_status": {k: int(v) for k, v in final.get_column(schema.FETCH_STATUS).value_counts().rows()},
    }


def finished_marker(run_dir: str, shard: str, table: pa.Table, counts: dict[str, Any]) -> ShardMarker:
    """The completion marker of a shard whose annotation file is `table`: the file's own counts,
    the prepare/score `counts` (rows_read, forgotten, fetch_attempted, fetch_ok, timings) and the
    time. A count key the marker does not know, or of the wrong type, is a ValueError."""
    own = annotation_counts(pl.from_arrow(table.select([schema.FETCH_STATUS, schema.CLIP_SCORE])))
    if counts.get("rows", own["rows"]) != own["rows"]:
        raise ValueError(f"shard {shard}: the counts say {counts['rows']} rows, its annotation table has {own['rows']}")
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = {"shard": shard, **counts, **own, "finished_at": finished_at}
    return ShardMarker.from_json(data, store.marker_path(run_dir, shard))


def recount(marker: ShardMarker, final: pl.DataFrame) -> ShardMarker:
    """The marker of a shard whose annotation file lost rows (curate forget): rows, scored and
    fetch_status from the file `final`; rows_read stays, so the rows gone count as forgotten."""
    counts = annotation_counts(final)
    return replace(marker, **counts, forgotten=marker.rows_read - counts["rows"])


def marker_counts(run_dir: str, shard: str) -> dict[str, int]:
    """rows_read and forgotten of a finished shard, to carry into a rewritten marker."""
    mk = store.read_marker(run_dir, shard)
    return {"rows_read": mk.rows_read, "forgotten": mk.forgotten}


def run_totals(run_dir: str, shards: list[str]) -> RunTotals:
    """Counts per stage over completed shards, from their markers: rows in the annotation files,
    rows forgotten, rows that passed the text rules and were sent to the fetcher (by each shard's
    last prepare), fetched OK, and rows holding a score; fetch statuses summed. A count an older
    marker did not record (fetch_attempted, fetch_ok: None) adds 0."""
    markers = _per_shard(store.read_marker, run_dir, shards)
    status: dict[str, int] = {}
    for mk in markers.values():
        for k, v in mk.fetch_status.items():
            status[k] = status.get(k, 0) + v
    return RunTotals(
        shards_complete=len(shards),
        rows=sum(mk.rows for mk in markers.values()),
        forgotten=sum(mk.forgotten for mk in markers.values()),
        fetch_attempted=sum(mk.fetch_attempted or 0 for mk in markers.values()),
        fetch_ok=sum(mk.fetch_ok or 0 for mk in markers.values()),
        scored=sum(mk.scored for mk in markers.values()),
        fetch_status=status,
    )


def refresh_counts(run_dir: str, m: Manifest) -> None:
    """After markers were rewritten (curate forget): the manifest's per-shard rows, rows_read and
    forgotten, and its run totals (when the run has summed its shards), from the markers."""
    shards = annotations.completed_shards(run_dir)
    entries = m.shards
    for shard, mk in _per_shard(store.read_marker, run_dir, shards).items():
        entries.setdefault(shard, {}).update({"rows": mk.rows, "rows_read": mk.rows_read, "forgotten": mk.forgotten})
    if m.counts is not None:
        m["counts"] = run_totals(run_dir, shards).to_json()


def reconcile_report(
    report: dict[str, Any], run_dir: str, shards: list[str], excluded: dict[str, int] | None = None
) -> dict[str, Any]:
    """Add forgotten rows to a selection report and check kept + removed + forgotten == rows_read
    per shard and in total (rows_read and forgotten from the completion markers; `excluded`: rows
    the selection-time filter left out, which count as forgotten too). Adds totals.forgotten,
    totals.rows_read and per shard the same; a mismatch is a problem and the report does not
    reconcile. Returns {shard: {rows_read, forgotten}}."""
    excluded = excluded or {}
    markers = _per_shard(store.read_marker_or_bare, run_dir, shards)
    rows_in = {str(x["shard"]): int(x["rows_in"]) for x in report.get("shards", [])}
    per: dict[str, dict[str, int]] = {}
    for s, mk in markers.items():
        forgotten = (mk.forgotten if mk else 0) + int(excluded.get(s, 0))
        # a bare marker ({}, hand-made) states nothing to check against: trust the rows
        read = mk.rows_read if mk else rows_in.get(s, 0) + forgotten
        per[s] = {"rows_read": read, "forgotten": forgotten}
    problems = []
    for s, c in per.items():
        if rows_in.get(s, 0) + c["forgotten"] != c["rows_read"]:
            problems.append(
                f"shard {s}: {rows_in.get(s, 0):,} rows decided + {c['forgotten']:,} forgotten != {c['rows_read']:,} rows read"
            )
    for x in report.get("shards", []):
        c = per.get(str(x["shard"]), {"rows_read": int(x["rows_in"]), "forgotten": 0})
        x["forgotten"], x["rows_read"] = c["forgotten"], c["rows_read"]
    t = report.setdefault("totals", {})
    t["forgotten"] = sum(c["forgotten"] for c in per.values())
    t["rows_read"] = sum(c["rows_read"] for c in per.values())
    if problems:
        report.setdefault("problems", []).extend(problems)
        report["reconciles"] = False
    return per


def excluded_counts(run_dir: str, shards: list[str]) -> dict[str, int]:
    """Rows still in finished annotation files that a uid/sha256 key matches, per shard (zero
    after `curate forget`; non-zero only if a shard was written while a forget ran)."""
    keys = load_keys(run_dir)
    if not keys or not shards:
        return {}
    lf = annotations.scan(run_dir, shards, include_forgotten=True)
    expr = exclude_expr(keys, lf.collect_schema().names())
    df = lf.filter(expr).group_by(schema.SHARD).len().collect()
    return {s: int(n) for s, n in df.iter_rows()}
