"""CLIP-threshold sweep from cached annotations: retention vs. threshold, overall and per group,
and what flips between two thresholds. Same rule semantics as :func:`curate.filters.decide.decide`.

Why this is exact, not an approximation. Vary only the CLIP threshold ``t``; every other rule is
fixed. Dedup runs among rows that pass every other rule and the threshold, and a duplicate group's
survivor is the highest score (then uid, shard, row). So within a URL group the survivor at any
``t`` is the group's top row whenever that top row passes ``t`` (and nobody survives otherwise);
image dedup then runs among URL survivors with the same order. Hence there is a fixed set of
*representative* rows -- exactly the rows ``decide()`` keeps with the threshold at -inf -- and at
threshold ``t`` the kept rows are precisely the representatives with ``score >= t``. We compute
the representatives once with ``decide()`` itself and then count, per group, the representatives
at or above each threshold: one sort for dedup plus a group-by, instead of one ``decide()`` per
threshold. (A ``top_fraction`` rule is a threshold too; the sweep varies the threshold directly.)
With the threshold active, rows without a score are ``not_scored`` at every threshold.

Per-group thresholds (``clip.by``, ``clip.thresholds``: docs/POLICY.md). The sweep varies the
default (``min_score``) and shifts every group's threshold by the same offset: at sweep point ``t``
a group whose threshold is ``T_g`` (default ``D``) is cut at ``T_g + (t - D)``, rounded to 10
decimals, and exactly at ``T_g`` when ``t == D``; so the sweep's point ``D`` is the selection, and
the gap between groups stays as the spec wrote it. The representatives are the same rows (the
threshold is -inf in every group) and each is counted against its own group's cut. That is exact
when no duplicate group holds copies with different thresholds (a copy's group is its survivor's):
then the argument above holds group by group. Where copies of one image or URL fall in groups with
different thresholds, a survivor below its group's cut can let a copy above a lower cut survive in
a real selection while the sweep counts it removed: ``spanning_duplicates`` counts such key groups
for the exact dedups (``curate sweep`` checks it; a near dedup cannot be checked this way).

A near-duplicate dedup (``dedup.image_cosine``, ``dedup.caption_near``) is where the argument stops
being exact. Its groups are connected components of similarity edges, not keys, and a component can
hang together only through a row of lower score: A ~ B ~ C with A and C apart, scores 0.9, 0.5,
0.8. At -inf one component, A survives, and the sweep counts A alone at 0.6; a real selection at
0.6 drops B with the threshold, A and C fall apart, and both are kept. Whenever clustering compares
every pair (the pool within ``image_cluster_size``), each representative above t still tops its
part of the component, so the sweep is a **lower bound** on the rows kept, exact when no such
bridge lies below t; with k-means clusters, fitted on the pool a threshold leaves, not even that is
guaranteed. ``near_dedup_on`` says when this applies; the sweep's answer carries it and every
place that shows a sweep says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import polars as pl

from curate import schema
from curate.config import ClipRule, SelectionConfig
from curate.filters.decide import decide, decide_inputs, dedup_steps
from curate.filters.rules import rule_failures
from curate.reports.groups import VALUE, GroupTable, table_order
from curate.reports.sources import BlockSource, FrameSource, Head, Source, SumBy, _in_values, as_source

SCORE = "_score"
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)
IDX = "_above"  # number of sweep thresholds <= the row's score


def thresholds(start: float, stop: float, step: float) -> list[float]:
    """start, start+step, ..., up to stop inclusive (rounded to 10 decimals, no float drift)."""
    if step <= 0:
        raise ValueError("step must be > 0")
    if stop < start:
        raise ValueError("--to must be >= --from")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


NEAR_DEDUP_CAVEAT = (
    "a near-duplicate dedup is on: its clusters can hang together through rows below a threshold, and a "
    "real selection there keeps each part's best row, so it can keep more rows than counted here (a lower "
    "bound while every pair is compared; docs/REPORTS.md)"
)


def near_dedup_on(sel: SelectionConfig) -> bool:
    """Whether selection `sel` runs a near-duplicate dedup step (clusters, not keys): its sweep is
    then a lower bound, not exact (module doc)."""
    return any(key is None for _, key in dedup_steps(sel))


def not_sweepable(sel: SelectionConfig) -> str | None:
    """Why this selection has no exact sweep, or None. The representatives argument (module doc)
    holds only when a duplicate group's survivor is its highest score (dedup.survivor =
    "best_score"): with "first" or "priority" the survivor among the rows above a threshold
    changes with the threshold, so one decide() cannot stand for all of them."""
    if sel.dedup.survivor != "best_score":
        return (
            f"dedup.survivor = {sel.dedup.survivor!r}: the exact sweep, the flips between thresholds and the "
            "boundary gallery need survivor = 'best_score' (with another survivor rule the kept copy of a "
            "duplicate group changes with the threshold); compare thresholds with `curate select` and `curate diff`"
        )
    return None


def check_sweepable(annotations: pl.LazyFrame, sel: SelectionConfig) -> None:
    """A ValueError saying why selection `sel` of these annotations has no exact sweep: a survivor
    rule other than best_score (not_sweepable), or no row with a CLIP score."""
    if (why := not_sweepable(sel)) is not None:
        raise ValueError(why)
    if (
        schema.CLIP_SCORE not in annotations.collect_schema().names()
        or annotations.select(pl.col(schema.CLIP_SCORE).fill_nan(None).drop_nulls().len()).collect().item() == 0
    ):
        raise ValueError(
            "no row of this run has a CLIP score (a run with score.source = none, or nothing "
            "fetched): there is no CLIP threshold to sweep"
        )


def representatives(
    annotations: pl.LazyFrame,
    sel: SelectionConfig,
    keep: Sequence[str] | None = None,
    embeddings: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Rows kept at threshold -inf (see module doc): kept at t iff their score >= t. With ``keep``,
    only the rule inputs and these columns go through decide() (much less to sort and join).
    embeddings: the run's image embeddings, for selections with dedup.image_cosine."""
    if keep is not None:
        have = annotations.collect_schema().names()
        wanted = decide_inputs(sel)
        annotations = annotations.select([c for c in have if c in wanted or c in keep])

    decisions, _ = decide(annotations, at_any_threshold(sel), explain=False, embeddings=embeddings)
    return scored(decisions.filter(pl.col(schema.KEPT)))


def at_any_threshold(sel: SelectionConfig) -> SelectionConfig:
    """`sel` with its CLIP rule at threshold -inf: the rules whose kept rows are the representatives
    (both engines decide with it: this module, curate/distributed_selection.py)."""
    return sel.model_copy(update={"clip": ClipRule.model_construct(min_score=float("-inf"), top_fraction=None)})


def scored(kept: Frame) -> Frame:
    """Kept rows as representatives: their score as float64 in SCORE, rows without one left out
    (decide() has already turned NaN into no score)."""
    return kept.with_columns(pl.col(schema.CLIP_SCORE).cast(pl.Float64).alias(SCORE)).filter(
        pl.col(SCORE).is_not_null()
    )


def shifted(clip: ClipRule | None, t: float) -> dict[str, float]:
    """The per-group thresholds at sweep point `t` (the default's value): every group's threshold
    moved by t - min_score, rounded to 10 decimals (no float drift: 0.28 + 0.01 is 0.29), and the
    spec's own thresholds at t == min_score. Empty without per-group thresholds."""
    if clip is None or clip.by is None or clip.min_score is None:
        return {}
    if t == clip.min_score:
        return dict(clip.thresholds)
    return {g: round(v + (t - clip.min_score), 10) for g, v in clip.thresholds.items()}


def group_cut(clip: ClipRule | None, t: float, dtype: pl.DataType = pl.Float64) -> pl.Expr:
    """Each row's threshold at sweep point `t` as decide() compares it (see _cuts), an expression
    over clip.by; `t` for every row without per-group thresholds."""
    chain: Any = pl
    group = pl.col(clip.by).cast(pl.String) if clip is not None and clip.by is not None else None
    for g, v in shifted(clip, t).items():
        chain = chain.when(group == g).then(pl.lit(_cuts([v], dtype)[0]))
    return pl.lit(_cuts([t], dtype)[0]) if chain is pl else chain.otherwise(pl.lit(_cuts([t], dtype)[0]))


def _cuts(thr: Sequence[float], dtype: pl.DataType) -> pl.Series:
    # decide() compares the score column with a float literal, which polars casts to the column's
    # type: a float32 score is compared with float32(t). Do the same, or a score of 0.301f would
    # be kept at t=0.301 by the selection and not by the sweep.
    return pl.Series(list(thr), dtype=pl.Float64).cast(dtype).cast(pl.Float64)


def as_compared(t: float, dtype: pl.DataType) -> float:
    """Threshold `t` as decide() compares it with a score of type `dtype` (float32(t) for float32)."""
    return float(_cuts([t], dtype if dtype in (pl.Float32, pl.Float64) else pl.Float64)[0])


def _above(thr: Sequence[float], dtype: pl.DataType = pl.Float64, clip: ClipRule | None = None) -> pl.Expr:
    """The number of sweep points whose cut is <= the row's score (kept at point i iff > i). With
    per-group thresholds each row is counted against its own group's cuts (shifted)."""

    def count(points: Sequence[float]) -> pl.Expr:
        return pl.lit(_cuts(points, dtype)).search_sorted(pl.col(SCORE), side="right").cast(pl.Int64)

    if clip is None or clip.by is None:
        return count(thr)
    group = pl.col(clip.by).cast(pl.String)
    chain: Any = pl
    for g in clip.thresholds:
        chain = chain.when(group == g).then(count([shifted(clip, t)[g] for t in thr]))
    return chain.otherwise(count(thr))


def spanning_duplicates(annotations: pl.LazyFrame, sel: SelectionConfig, group: pl.Expr) -> dict[str, Any]:
    """Whether the sweep's per-group counts are exact for groups `group` (an expression: a row's
    threshold, or its value of the column the thresholds would follow): the key groups of each exact
    dedup, among the rows every per-row rule but the CLIP rule keeps, whose rows fall in more than
    one group ({"key_groups": n per dedup reason, "checked": False when a near dedup is on: its
    clusters are not keys}). None of them: a loser and its survivor always share a group, so the
    representatives argument (module doc) holds group by group."""
    fails = rule_failures(sel, None)
    pool = annotations.filter(pl.any_horizontal(list(fails.values())).not_()).with_columns(group.alias("_group"))
    out: dict[str, Any] = {"key_groups": {}, "checked": True}
    steps = dedup_steps(sel)
    for reason, key in steps:
        if key is None:
            out["checked"] = False  # a near dedup: clusters, not keys
            continue
        n = (
            pool.select(key.alias("_key"), "_group")
            .filter(pl.col("_key").is_not_null())
            .group_by("_key")
            .agg(pl.col("_group").n_unique().alias("_n"))
            .filter(pl.col("_n") > 1)
            .select(pl.len())
            .collect(engine="streaming")
            .item()
        )
        out["key_groups"][reason.value] = int(n)
    return out


def _curve(counts: dict[int, int], n_thr: int) -> list[int]:
    """kept at threshold i = representatives with more than i thresholds <= their score."""
    out, acc = [0] * n_thr, 0
    for i in range(n_thr - 1, -1, -1):
        acc += counts.get(i + 1, 0)
        out[i] = acc
    return out


def sweep(
    annotations: pl.LazyFrame | Source,
    sel: SelectionConfig,
    thr: Sequence[float],
    *,
    group_columns: Sequence[str] = (),
    top_groups: int = 6,
    include: dict[str, Sequence[str]] | None = None,
    reps: pl.LazyFrame | Source | None = None,
    embeddings: pl.LazyFrame | None = None,
    group_tables: dict[str, GroupTable] | None = None,
) -> dict[str, Any]:
    """Retention vs threshold overall and, per grouping column, for its ``top_groups`` largest
    groups plus any named in ``include[column]``. Returns a JSON-able dict; ``tables`` holds the
    long-form polars tables (threshold, group, rows_in, kept, retention). `annotations` (every
    row, for the group sizes) and `reps` may be frames or sources of frames
    (curate/reports/sources.py: the Ray engine's blocks). group_tables: the report's full tables
    of these groupings over the same rows (curate/reports/groups.py): the sizes of the largest and
    the named groups are asked of them, so no grouping's every value comes here; without, a
    grouping's sizes are counted here (every value: fine for a frame of this process)."""
    thr = sorted(float(t) for t in thr)
    if not thr:
        raise ValueError("no thresholds to sweep")
    include = include or {}
    rows = as_source(annotations)
    dtype = rows.schema().get(schema.CLIP_SCORE)
    if reps is None:  # (build_audit passes reps, and only when the run has scores)
        check_sweepable(annotations, sel)
        reps = representatives(annotations, sel, keep=list(group_columns), embeddings=embeddings)
    by = [sel.clip.by] if sel.clip.by is not None and sel.clip.by not in group_columns else []
    if not isinstance(reps, (FrameSource, BlockSource)):
        # decide() runs once: materialise the few columns the counts need, so the per-group
        # queries below do not each re-run the dedup plan
        reps = FrameSource(reps.lazy().select(SCORE, *group_columns, *by).collect(engine="streaming"))
    if by and by[0] not in reps.schema().names():
        raise ValueError(f"the sweep's representatives lack {by[0]!r}, the column of the per-group thresholds")
    above = _above(thr, dtype if dtype in (pl.Float32, pl.Float64) else pl.Float64, sel.clip).alias(IDX)
    n = pl.len().cast(pl.Int64).alias("n")
    group_tables = group_tables or {}
    sizes = {"rows": ((lambda lf: lf.select(n)), SumBy())}
    for c in group_columns:
        if c not in group_tables:
            sizes[f"size:{c}"] = (
                (lambda lf, c=c: lf.group_by(c).agg(pl.len().cast(pl.Int64).alias("rows_in"))),
                SumBy((c,)),
            )
    res = rows.collect(sizes)
    rows_in = int(res["rows"]["n"][0])
    # per grouping: the groups to draw (the largest, then the named ones found) as (value, named, size)
    picked: dict[str, list[tuple[Any, bool, int]]] = {}
    for c in group_columns:
        if c in group_tables:
            table = group_tables[c]
            strings = [v for v in include.get(c, []) if isinstance(v, str)]
            found = [table.top(top_groups).select(VALUE, "rows_in")] + ([table.matching(strings)] if strings else [])
            size = table_order(pl.concat(found).unique(VALUE, maintain_order=True)).rename({VALUE: c})
        else:
            size = res[f"size:{c}"].sort(["rows_in", c], descending=[True, False], nulls_last=True)
        picked[c] = _picked(size.select(c, "rows_in"), top_groups, include.get(c, []))
    counts = {"overall": ((lambda lf: lf.select(above).group_by(IDX).agg(n)), SumBy((IDX,)))}
    for c in group_columns:
        keys = [k for k, _, size in picked[c] if size]  # a value no row has: nothing to count
        counts[f"hist:{c}"] = (
            (
                lambda lf, c=c, keys=keys: (
                    lf.filter(_in_values(c, keys, lf.collect_schema())).select(c, above).group_by(c, IDX).agg(n)
                )
            ),
            SumBy((c, IDX)),
        )
    res.update(reps.collect(counts))
    overall_kept = _curve(dict(res["overall"].iter_rows()), len(thr))
    out: dict[str, Any] = {
        "thresholds": thr,
        "rows_in": rows_in,
        "overall": {"kept": overall_kept, "retention": [k / rows_in if rows_in else None for k in overall_kept]},
        "groups": {},
        "method": "exact: representatives (decide() at threshold -inf) counted at or above each threshold",
        # None, or why the counts are a lower bound (module doc): a near-duplicate dedup is on
        "near_dedup": NEAR_DEDUP_CAVEAT if near_dedup_on(sel) else None,
    }
    if sel.clip.by is not None:
        out["per_group"] = {
            "by": sel.clip.by,
            "default": sel.clip.min_score,
            # each group's threshold at every sweep point: the default's value plus the spec's gap
            "thresholds": {g: [shifted(sel.clip, t)[g] for t in thr] for g in sel.clip.thresholds},
        }
        out["method"] = (
            "exact when no duplicate group holds copies with different thresholds: representatives (decide() at "
            f"threshold -inf) counted at or above their own group's threshold; the sweep varies the default "
            f"(min_score) and moves every {sel.clip.by} threshold by the same offset"
        )
    if out["near_dedup"]:
        out["method"] += "; " + out["near_dedup"]
    long = [
        pl.DataFrame(
            {"column": "(all)", "value": "(all)", "threshold": thr, "rows_in": rows_in, "kept": overall_kept},
            schema_overrides={"rows_in": pl.Int64, "kept": pl.Int64},
        )
    ]
    for c in group_columns:
        hist = res[f"hist:{c}"]
        curves = []
        for key, named, n in picked[c]:
            h = hist.filter(pl.col(c).is_null() if key is None else pl.col(c) == key)
            kept = _curve(dict(h.select(IDX, "n").iter_rows()), len(thr))
            curves.append(
                {
                    "value": "(unknown)" if key is None else str(key),
                    "rows_in": n,
                    "kept": kept,
                    "retention": [k / n if n else None for k in kept],
                    "named": named,
                }
            )
            long.append(
                pl.DataFrame(
                    {
                        "column": c,
                        "value": "(unknown)" if key is None else str(key),
                        "threshold": thr,
                        "rows_in": n,
                        "kept": kept,
                    },
                    schema_overrides={"rows_in": pl.Int64, "kept": pl.Int64},
                )
            )
        out["groups"][c] = curves
    table = pl.concat(long).with_columns((pl.col("kept") / pl.col("rows_in")).alias("retention"))
    out["tables"] = {"sweep": table}
    return out


def _picked(sizes: pl.DataFrame, top_groups: int, include: Sequence[Any]) -> list[tuple[Any, bool, int]]:
    """The groups a sweep draws: the `top_groups` first of `sizes` (value, rows_in: in the table's
    order, holding at least those and every value whose string is a named one), then the named
    values found; each as (value, named, rows_in)."""
    c = sizes.columns[0]
    wanted = sizes.head(top_groups)[c].to_list()
    named = [v for v in include if v not in wanted]
    if named:
        have = set(sizes[c].cast(pl.String).to_list())
        wanted += [v for v in named if v in have]
    size_of = {r[0]: r[1] for r in sizes.iter_rows()}
    out = []
    for v in wanted:
        key = v
        if key not in size_of:  # a named value given as a string for a non-string column
            key = next((k for k in size_of if str(k) == str(v)), v)
        out.append((key, v in named, int(size_of.get(key, 0))))
    return out


def flips(
    reps: pl.LazyFrame | Source,
    a: float,
    b: float,
    *,
    group_columns: Sequence[str] = (),
    sizes: dict[str, pl.DataFrame | GroupTable] | None = None,
    sample: int = 20,
    top: int = 10,
    score_dtype: pl.DataType = pl.Float32,
    clip: ClipRule | None = None,
) -> dict[str, Any]:
    """What changes between threshold a and b (a < b is stricter at b): the representatives with
    a <= score < b are kept at a and removed (clip_score) at b; nothing else changes fate. Per
    group: rows that flip and the change in retention, largest change first. sizes[column]: the
    groups' rows_in, a frame (column, rows_in) or the report's GroupTable (asked for the groups that
    flip only). clip: the selection's CLIP rule; with per-group thresholds, a and b are values of the
    default and each group's threshold moves with it (`shifted`), as in the sweep."""
    lo, hi = (a, b) if a <= b else (b, a)
    src = as_source(reps)
    # compare as decide() does (see _cuts): a float32 score with float32 thresholds
    dtype = score_dtype if score_dtype in (pl.Float32, pl.Float64) else pl.Float64
    band = (pl.col(SCORE) >= group_cut(clip, lo, dtype)) & (pl.col(SCORE) < group_cut(clip, hi, dtype))
    have = set(src.schema().names())
    cols = [
        c
        for c in dict.fromkeys((schema.UID, schema.SHARD, schema.ROW, schema.CAPTION, SCORE, *group_columns))
        if c in have
    ]
    queries = {
        "n": ((lambda lf: lf.filter(band).select(pl.len().cast(pl.Int64).alias("n"))), SumBy()),
        "sample": (
            (lambda lf: lf.filter(band).sort(SCORE, schema.UID).select(cols).head(sample)),
            Head((SCORE, schema.UID), (False, False), sample),
        ),
    }
    for c in group_columns:
        queries[f"g:{c}"] = (
            (lambda lf, c=c: lf.filter(band).group_by(c).agg(pl.len().cast(pl.Int64).alias("flips"))),
            SumBy((c,)),
        )
    res = src.collect(queries)
    out: dict[str, Any] = {
        "a": a,
        "b": b,
        "rows": int(res["n"]["n"][0]),
        "direction": "kept at the lower threshold, removed at the higher",
        "groups": {},
    }
    s = res["sample"].rename({SCORE: "clip_score"})
    out["sample"] = [
        {k: (str(v) if k in group_columns and v is not None else v) for k, v in r.items()}
        for r in s.iter_rows(named=True)
    ]
    tables = {"flips_sample": s}
    for c in group_columns:
        g = res[f"g:{c}"]
        if sizes and c in sizes:
            size = sizes[c]
            if isinstance(size, GroupTable):
                size = size.lookup(g[c]).rename({VALUE: c})
            g = g.join(size.select(c, "rows_in"), on=c, how="left", nulls_equal=True)
            g = g.with_columns((pl.col("flips") / pl.col("rows_in")).alias("retention_change"))
        else:
            g = g.with_columns(
                pl.lit(None, pl.Int64).alias("rows_in"), pl.lit(None, pl.Float64).alias("retention_change")
            )
        # the value last: groups that tie on both come in one order, whatever order the counts came in
        g = g.sort(["retention_change", "flips", c], descending=[True, True, False], nulls_last=True)
        tables[f"flips_{c}"] = g
        out["groups"][c] = [
            {
                "value": "(unknown)" if r[c] is None else str(r[c]),
                "flips": int(r["flips"]),
                "rows_in": r["rows_in"],
                "retention_change": r["retention_change"],
            }
            for r in g.head(top).iter_rows(named=True)
        ]
    out["tables"] = tables
    return out
