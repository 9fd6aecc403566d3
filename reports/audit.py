"""The full audit report of one selection: the counts report (:mod:`curate.reports.summary`), the
threshold sweep and A/B flips (:mod:`curate.reports.sweep`), the boundary gallery, and every table
as parquet under ``selections/<name>/tables/`` (a grouping's full table in parts: read it with
:func:`read_table`). Written by ``curate select``/``run`` and re-rendered by ``curate report``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from curate import io, schema
from curate.config import ClipRule, ReportConfig, SelectionConfig
from curate.reports.groups import GroupTable, read_table  # noqa: F401 - read_table: the tables' reader
from curate.reports.summary import build_report, write_report
from curate.reports.gallery_rows import THUMB, picked_rows
from curate.reports.sources import BlockSource, FrameSource, Head, Source, as_source
from curate.filters.rules import clip_by
from curate.reports.sweep import SCORE, flips, group_cut, not_sweepable, representatives, sweep, thresholds
from curate.reports.tradeoff import REPORT_TARGETS, tradeoff

SWEEP_STEPS = 26
GALLERY_GROUPS = 6
GALLERY_PER_SIDE = 4
GALLERY_WINDOW = 30  # sample from the this-many rows nearest the threshold on each side


def _nice_range(reps: Source, t0: float | None) -> list[float]:
    """Default sweep: 26 thresholds over the 2nd..98th percentile of the representatives' scores
    (rounded to a step of 0.01, 0.005, ...), always including the selection's own threshold."""
    st = reps.scores(SCORE, {"lo": 0.02, "hi": 0.98}, interpolation="nearest").row(0, named=True)
    if st["scored"] == 0:
        return [t0] if t0 is not None else []
    lo, hi = float(st["lo"]), float(st["hi"])
    if t0 is not None:
        lo, hi = min(lo, t0), max(hi, t0)
    span = max(hi - lo, 1e-6)
    raw = span / (SWEEP_STEPS - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    n = max(1, math.ceil((hi - start) / step - 1e-9))
    thr = thresholds(round(start, 10), round(start + step * n, 10), step)
    if t0 is not None and all(abs(t - t0) > 1e-12 for t in thr):
        thr = sorted(thr + [t0])
    return thr


def boundary_gallery(
    run_dir: str | None,
    reps: pl.DataFrame | Source,
    annotations: pl.LazyFrame,
    threshold: float,
    column: str,
    values: Sequence[Any],
    *,
    per_side: int = GALLERY_PER_SIDE,
    window: int = GALLERY_WINDOW,
    seed: int = 0,
    clip: ClipRule | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """For each group value: ``per_side`` rows sampled (seeded) from the ``window`` rows just above
    the threshold (kept) and just below it (removed by clip_score). Only representatives, i.e. rows
    whose fate the threshold decides. Returns the JSON part and the thumbnails ({uid: data URI}).
    clip: the selection's CLIP rule; with per-group thresholds (clip.by) each row is above or below
    its own group's threshold (`threshold` is then the default)."""
    cut = group_cut(clip, threshold) if clip is not None and clip.by is not None else threshold
    picked: list[dict[str, Any]] = []
    groups = []
    near = (schema.UID, schema.SHARD, schema.ROW, SCORE)
    queries = {}
    for i, v in enumerate(values):
        grp = pl.col(column).is_null() if v is None else pl.col(column) == v
        above, below = grp & (pl.col(SCORE) >= cut), grp & (pl.col(SCORE) < cut)
        queries[f"above:{i}"] = (
            (lambda lf, w=above: lf.filter(w).sort([SCORE, schema.UID]).head(window).select(near)),
            Head((SCORE, schema.UID), (False, False), window),
        )
        queries[f"below:{i}"] = (
            (
                lambda lf, w=below: (
                    lf.filter(w).sort([SCORE, schema.UID], descending=[True, False]).head(window).select(near)
                )
            ),
            Head((SCORE, schema.UID), (True, False), window),
        )
    found = as_source(reps).collect(queries) if queries else {}
    for i, v in enumerate(values):
        sides = {}
        for side in ("above", "below"):
            rows = found[f"{side}:{i}"].to_dicts()
            rng = random.Random(f"{seed}|{column}|{v}|{side}")
            chosen = sorted(rng.sample(rows, min(per_side, len(rows))), key=lambda r: r[SCORE])
            sides[side] = chosen
            picked += chosen
        groups.append({"value": "(unknown)" if v is None else str(v), **sides})
    thumbs: dict[str, str] = {}
    if picked:
        by_shard: dict[str, list[int]] = {}
        for p in picked:
            by_shard.setdefault(p[schema.SHARD], []).append(int(p[schema.ROW]))
        if run_dir:  # a task per shard on the selection's executor (reports/gallery_rows.py)
            info = picked_rows(run_dir, by_shard, reps.executor if isinstance(reps, BlockSource) else None)
        else:
            info = pl.concat(
                [
                    annotations.filter((pl.col(schema.SHARD) == shard) & pl.col(schema.ROW).is_in(rows))
                    .select(schema.SHARD, schema.ROW, schema.CAPTION, schema.URL)
                    .collect(engine="streaming")
                    for shard, rows in sorted(by_shard.items())
                ]
            ).with_columns(pl.lit(None, pl.String).alias(THUMB))
        text = {(r[schema.SHARD], r[schema.ROW]): r for r in info.iter_rows(named=True)}
        for g in groups:
            for side in ("above", "below"):
                for p in g[side]:
                    k = (p[schema.SHARD], p[schema.ROW])
                    p["clip_score"] = p.pop(SCORE)
                    found = text.get(k) or {}
                    p["caption"] = found.get(schema.CAPTION)
                    p["url"] = found.get(schema.URL)
                    if found.get(THUMB):
                        thumbs[p[schema.UID]] = found[THUMB]
                    p["has_image"] = bool(found.get(THUMB))
    return (
        {
            "column": column,
            "threshold": threshold,
            # per-group thresholds (clip.by): the column and each listed value's own; the rest: threshold
            "per_group": (
                {"by": clip.by, "thresholds": dict(clip.thresholds)}
                if clip is not None and clip.by is not None
                else None
            ),
            "per_side": per_side,
            "window": window,
            "seed": seed,
            "groups": groups,
        },
        thumbs,
    )


def build_audit(
    decisions: pl.LazyFrame | Source,
    annotations: pl.LazyFrame,
    sel: SelectionConfig,
    clip_threshold: float | None,
    *,
    report_cfg: ReportConfig | None = None,
    extra_group_columns: Sequence[str] = (),
    meta: dict | None = None,
    run_dir: str | None = None,
    sweep_thresholds: Sequence[float] | None = None,
    compare: tuple[float, float] | None = None,
    sweep_include: dict[str, Sequence[str]] | None = None,
    gallery_column: str | None = None,
    seed: int = 0,
    embeddings: pl.LazyFrame | None = None,
    representatives_of: Callable[[list[str]], Source] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report dict (with ``sweep``, ``flips``, ``gallery`` and ``_thumbs``) and its tables.
    embeddings: the run's image embeddings, when the selection uses dedup.image_cosine.
    representatives_of(columns): the sweep's representatives with those columns (the Ray engine
    computes them on the cluster); None: decide() here (curate.reports.sweep.representatives)."""
    cfg = report_cfg or ReportConfig()
    decisions = as_source(decisions)
    report, tables = build_report(
        decisions,
        extra_group_columns=extra_group_columns,
        min_group_size=cfg.min_group_size,
        top_groups=cfg.top_groups,
        meta=meta,
        return_tables=True,
        selection=sel,  # what its rules target by design: the net-of-policy views (reports/policy_net.py)
    )
    report["clip_threshold"] = clip_threshold
    group_cols = report["settings"]["group_columns"]
    names = set(annotations.collect_schema().names())
    if schema.CLIP_SCORE not in names or not (report.get("clip_score") or {}).get("scored"):
        report["sweep"] = None
        report["sweep_note"] = "no CLIP scores in this run: no sweep, no boundary gallery"
        return report, tables
    if (why := not_sweepable(sel)) is not None:
        report["sweep"], report["sweep_note"] = None, why
        return report, tables
    # the per-group thresholds' column too (clip.by): each representative is counted against its own
    keep = list(dict.fromkeys([SCORE, schema.UID, schema.SHARD, schema.ROW, *group_cols, *clip_by(sel)]))
    if representatives_of is not None:
        reps = representatives_of(keep)
    else:
        reps = FrameSource(
            representatives(annotations, sel, keep=keep, embeddings=embeddings).select(keep).collect(engine="streaming")
        )
    thr = list(sweep_thresholds) if sweep_thresholds else _nice_range(reps, clip_threshold)
    # the group sizes are over every row: the decided rows (one per annotation row)
    group_tables = {c: tables[f"groups_{c}"] for c in group_cols}  # sizes asked of the parts: bounded here
    sw = sweep(
        decisions, sel, thr, group_columns=group_cols, include=sweep_include, reps=reps, group_tables=group_tables
    )
    tables.update(sw.pop("tables"))
    sw["selection_threshold"] = clip_threshold
    report["sweep"] = sw
    report["tradeoff"] = _tradeoff(reps, decisions, sel, report, group_cols, cfg, annotations)
    # flips: the selection's threshold vs. the sweep's next-but-one stricter step, unless given
    if compare is None:
        t = sw["thresholds"]
        a = clip_threshold if clip_threshold is not None else t[len(t) // 2]
        above = [x for x in t if x > a + 1e-12]
        b = above[min(1, len(above) - 1)] if above else a
        compare = (a, b)
    fl = flips(
        reps,
        compare[0],
        compare[1],
        group_columns=group_cols,
        sizes=group_tables,
        score_dtype=annotations.collect_schema()[schema.CLIP_SCORE],
        clip=sel.clip,
    )
    tables.update(fl.pop("tables"))
    report["flips"] = fl
    # boundary gallery
    if clip_threshold is not None:
        gc = gallery_column or (schema.LANGUAGE if schema.LANGUAGE in group_cols else group_cols[0])
        sec = report["groups"][gc]
        values = [None if g["unknown"] else g["value"] for g in sec["rows"] if not g["other_groups"]][:GALLERY_GROUPS]
        gal, thumbs = boundary_gallery(run_dir, reps, annotations, clip_threshold, gc, values, seed=seed, clip=sel.clip)
        report["gallery"] = gal
        report["_thumbs"] = thumbs
        tables["gallery"] = pl.DataFrame(
            [
                {
                    "group": g["value"],
                    "side": side,
                    **{k: p[k] for k in ("uid", "shard", "row", "clip_score", "caption", "has_image")},
                }
                for g in gal["groups"]
                for side in ("above", "below")
                for p in g[side]
            ],
            schema={
                "group": pl.String,
                "side": pl.String,
                "uid": pl.String,
                "shard": pl.String,
                "row": pl.Int64,
                "clip_score": pl.Float64,
                "caption": pl.String,
                "has_image": pl.Boolean,
            },
        )
    return report, tables


def _tradeoff(
    reps: Source,
    decisions: Source,
    sel: SelectionConfig,
    report: dict[str, Any],
    group_cols: list[str],
    cfg: ReportConfig,
    annotations: pl.LazyFrame,
) -> dict[str, Any] | None:
    """The retention-disparity trade-off (reports/tradeoff.py) by the per-group thresholds' column,
    else by language, when the report groups by it: over REPORT_TARGETS and this selection's own
    retention."""
    column = sel.clip.by if sel.clip.by is not None else schema.LANGUAGE
    if column not in group_cols:
        return None
    totals = report["totals"]
    own = totals["kept"] / totals["rows_in"] if totals.get("rows_in") else None
    targets = sorted({*REPORT_TARGETS, *([own] if own else [])})
    return tradeoff(
        reps,
        decisions,
        column,
        targets,
        score_dtype=annotations.collect_schema()[schema.CLIP_SCORE],
        min_candidates=cfg.min_group_size,
    )


def write_tables(tables: dict[str, pl.DataFrame | GroupTable], out_dir: str) -> dict[str, dict[str, Any]]:
    """Every table as parquet under out_dir/tables/, each file atomically: a frame as <name>.parquet,
    a grouping's full table (GroupTable) as parts written by the tasks that hold them
    (<name>.<generation>.part-<i>-of-<n>.parquet, curate/reports/groups.py; read_table reads either).
    Returns {path: {bytes, sha256}} in the order written (for the run manifest's checksums)."""
    written: dict[str, dict[str, Any]] = {}
    for name, df in tables.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        if isinstance(df, GroupTable):
            written.update(df.write(io.join(out_dir, "tables"), safe))
            continue
        p = io.join(out_dir, "tables", f"{safe}.parquet")
        written[p] = io.write_parquet(p, df.to_arrow())
    return written


def write_audit(
    report: dict[str, Any], tables: dict[str, Any], out_dir: str
) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """(report.json path, report.html path, the tables' {path: {bytes, sha256}})."""
    digests = write_tables(tables, out_dir)
    return (*write_report(report, out_dir), digests)
