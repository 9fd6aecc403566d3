"""The retention-disparity trade-off of the CLIP rule, per value of one column: a decision aid that
proposes thresholds and never changes a selection (docs/POLICY.md, "The trade-off").

Terms (each counted, never estimated):

- candidates: the sweep's representatives (curate/reports/sweep.py): the rows every other rule,
  dedup included, keeps with the CLIP threshold at -inf, with a score. The rows whose fate the CLIP
  threshold decides; every other row is removed (or not scored) whatever the threshold.
- retention: rows kept / rows in the pool, as in the sweep and the report.
- a group's removal rate: the share of the group's candidates that the threshold removes (the CLIP
  rule's own rate; what other rules remove is the same at every threshold and is left out, so a
  group the language rule removes whole is not "equalised" by a threshold).
- units: the `top` largest values of the column with at least `min_candidates` candidates each get
  a threshold of their own; every other value, and rows with no value, share the default
  ("(other)"), as clip.thresholds and clip.min_score do.

For a target retention R the pool keeps k = round(R x rows in) rows (at most every candidate):

- single: one threshold, the k-th highest candidate score. Rows tied with it are all kept
  (score >= threshold, as the CLIP rule keeps), so k or a few more.
- equalised: k shared out among the units in proportion to their candidates (largest remainders:
  the shares add up to k and each is within one row of its exact share); a unit's threshold is its
  share-th highest score (above its highest when its share is 0). Every unit's removal rate is then
  the overall one to within 1/candidates of the unit (plus ties at its threshold).
- max_ratio M (>= 1): every unit's removal rate within [r / M, r x M] of the overall removal rate r
  = 1 - k / candidates. One default threshold for the units inside that band and for "(other)",
  the highest that keeps at least k rows; a unit the default would push outside gets the threshold
  at the band's edge (its own k-th highest score).

Every number reported is counted from the proposed thresholds with score >= threshold compared as
the CLIP rule compares it (a float32 score with float32(threshold)), never copied from a target.
The thresholds are float32 values written as the shortest decimal that reads back as the same
float32, so a spec that uses them keeps exactly the rows counted here. Those counts are the ones a
selection with these thresholds (clip.by = the column) makes when no duplicate group holds copies
in two units: sweep.spanning_duplicates checks it (`curate sweep` does, and says so).

Both selection engines ask through curate/reports/sources.py (candidates per value, exact order
statistics, counts), so the Ray engine's report has the same numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate.reports.sources import BlockSource, Source, SumBy, as_source
from curate.reports.sweep import SCORE, as_compared

OTHER = "(other)"
TOP_UNITS = 10  # values of the column with a threshold of their own, at most
REPORT_TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the report's curve, up to the candidates' share
_UNIT = "_unit"  # a row's unit: its index in Units.values, or -1 for "(other)"


@dataclass(frozen=True)
class Units:
    """The values of `column` that get a threshold of their own (as text, largest first), the
    candidates of each and of "(other)" (everything else, null included)."""

    column: str
    values: tuple[str, ...]
    candidates: tuple[int, ...]  # per value, then "(other)" last
    rows_in: tuple[int, ...]  # rows of the pool per value, then "(other)" last

    @property
    def labels(self) -> list[str]:
        return [*self.values, OTHER]

    def index(self) -> pl.Expr:
        """Each row's unit: the index of its value in `values`, -1 for "(other)"."""
        text = pl.col(self.column).cast(pl.String)
        chain: Any = pl
        for i, v in enumerate(self.values):
            chain = chain.when(text == v).then(pl.lit(i, pl.Int64))
        return pl.lit(-1, pl.Int64) if chain is pl else chain.otherwise(pl.lit(-1, pl.Int64))

    def filters(self) -> list[pl.Expr]:
        """One filter per unit, "(other)" last."""
        return [self.index() == i for i in range(len(self.values))] + [self.index() == -1]

    def cut(self, thresholds: Sequence[float], dtype: pl.DataType) -> pl.Expr:
        """Each row's threshold (per unit, "(other)" last) as the CLIP rule compares it."""
        text = pl.col(self.column).cast(pl.String)
        chain: Any = pl
        for v, t in zip(self.values, thresholds):
            chain = chain.when(text == v).then(pl.lit(as_compared(t, dtype)))
        default = pl.lit(as_compared(thresholds[-1], dtype))
        return default if chain is pl else chain.otherwise(default)


def units_of(reps: Source, rows: Source, column: str, *, top: int = TOP_UNITS, min_candidates: int = 30) -> Units:
    """The units of `column`: candidates counted per value (as text), the `top` largest with at
    least min_candidates each (ties by value), then every row of the pool counted per unit."""
    text = pl.col(column).cast(pl.String).alias(column)
    n = pl.len().cast(pl.Int64).alias("n")
    per_value = reps.collect(
        {"c": ((lambda lf: lf.filter(pl.col(SCORE).is_not_null()).group_by(text).agg(n)), SumBy((column,)))}
    )["c"]
    big = per_value.filter(pl.col(column).is_not_null() & (pl.col("n") >= min_candidates))
    values = tuple(big.sort(["n", column], descending=[True, False]).head(top)[column].to_list())
    units = Units(column, values, (), ())
    counted = {}
    for name, src, only_scored in (("candidates", reps, True), ("rows_in", rows, False)):

        def q(lf: pl.LazyFrame, only_scored: bool = only_scored) -> pl.LazyFrame:
            lf = lf.filter(pl.col(SCORE).is_not_null()) if only_scored else lf
            return lf.group_by(units.index().alias(_UNIT)).agg(n)

        got = dict(src.collect({name: (q, SumBy((_UNIT,)))})[name].iter_rows())
        counted[name] = tuple(int(got.get(i, 0)) for i in [*range(len(values)), -1])
    return Units(column, values, counted["candidates"], counted["rows_in"])


def _kth_highest(reps: Source, filters: list[pl.Expr | None], ks: list[list[int]], n: list[int]) -> list[list[float]]:
    """Per filter, its k-th highest candidate score for every k in ks[f] (1 <= k <= n[f], the
    filter's candidates): exact order statistics, on the Ray engine's blocks by radix select."""
    if isinstance(reps, BlockSource):

        def ranks_of(counts: list[int]) -> list[list[int]]:
            if list(counts) != list(n):
                raise RuntimeError(f"trade-off: candidates counted twice differ ({counts} != {n})")
            return [[c - k for k in want] for c, want in zip(counts, ks)]

        return reps.order_stats(SCORE, filters, ranks_of)[1]
    queries = {}
    for f, (flt, want) in enumerate(zip(filters, ks)):
        if not want:
            continue

        def q(lf: pl.LazyFrame, flt: pl.Expr | None = flt, want: list[int] = want) -> pl.LazyFrame:
            lf = lf if flt is None else lf.filter(flt)
            top = pl.col(SCORE).drop_nulls().sort(descending=True)
            return lf.select(top.gather([k - 1 for k in want]).implode())

        queries[str(f)] = (q, SumBy())
    got = reps.collect(queries)
    return [[float(x) for x in got[str(f)].item()] if ks[f] else [] for f in range(len(filters))]


def _above(score: float, dtype: pl.DataType) -> float:
    """The first threshold that keeps no row scoring `score`: the next value of the score's type."""
    kind = np.float32 if dtype == pl.Float32 else np.float64
    return float(np.nextafter(kind(score), kind(np.inf)))


def shortest(t: float, dtype: pl.DataType) -> float:
    """`t` as the shortest decimal that the CLIP rule's comparison reads as the same value
    (float32 scores: float32(decimal) == float32(t)), so a spec written with it keeps the same rows."""
    if dtype == pl.Float32:
        return float(str(np.float32(t)))
    return t


def _apportion(k: int, weights: Sequence[int]) -> list[int]:
    """k shared out in proportion to `weights` (largest remainders; ties to the earlier unit): the
    shares add up to k and each is within 1 of its exact share."""
    total = sum(weights)
    exact = [k * w / total for w in weights]
    share = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - share[i]), i))
    for i in order[: k - sum(share)]:
        share[i] += 1
    return share


def _policies(
    reps: Source, units: Units, policies: dict[str, list[float]], dtype: pl.DataType, rows_total: int
) -> dict[str, dict[str, Any]]:
    """What each policy's per-unit thresholds ("(other)" last) keep, counted in one pass over the
    candidates: per unit and overall kept rows, removal rates among the candidates, retention, the
    kept rows' mean score."""

    def query(cut: pl.Expr):
        def q(lf: pl.LazyFrame) -> pl.LazyFrame:
            kept = pl.col(SCORE).is_not_null() & (pl.col(SCORE) >= cut)
            return lf.group_by(units.index().alias(_UNIT)).agg(
                kept.sum().cast(pl.Int64).alias("kept"), pl.col(SCORE).filter(kept).sum().alias("score_sum")
            )

        return q, SumBy((_UNIT,))

    answers = reps.collect({name: query(units.cut(t, dtype)) for name, t in policies.items()})
    return {name: _counted(answers[name], units, t, dtype, rows_total) for name, t in policies.items()}


def _counted(
    answer: pl.DataFrame, units: Units, thresholds: list[float], dtype: pl.DataType, rows_total: int
) -> dict[str, Any]:
    got = {r[_UNIT]: r for r in answer.iter_rows(named=True)}
    groups, kept_all, score_all = [], 0, 0.0
    for i, label in zip([*range(len(units.values)), -1], units.labels):
        c, rows = units.candidates[i], units.rows_in[i]
        if not c and not rows:
            continue
        kept = int((got.get(i) or {}).get("kept") or 0)
        kept_all += kept
        score_all += float((got.get(i) or {}).get("score_sum") or 0.0)
        groups.append(
            {
                "value": label,
                "threshold": shortest(thresholds[i], dtype),
                "rows_in": rows,
                "candidates": c,
                "kept": kept,
                "removal_rate": 1 - kept / c if c else None,
                "retention": kept / rows if rows else None,
            }
        )
    rates = [g["removal_rate"] for g in groups if g["removal_rate"] is not None]
    candidates = sum(units.candidates)
    return {
        "kept": kept_all,
        "retention": kept_all / rows_total if rows_total else None,
        "removal_rate": 1 - kept_all / candidates if candidates else None,
        "score": {"mean": score_all / kept_all if kept_all else None},
        "rate_min": min(rates) if rates else None,
        "rate_max": max(rates) if rates else None,
        "rate_ratio": (max(rates) / min(rates)) if rates and min(rates) > 0 else None,
        "groups": groups,
    }


def _spec_line(column: str, default: float, per_value: dict[str, float]) -> str:
    """The CLIP rule as a spec's line (selection.clip)."""
    if not per_value:
        return f"clip = {{ min_score = {default!r} }}"
    keys = ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else _quoted(k)} = {v!r}" for k, v in per_value.items())
    return f"clip = {{ min_score = {default!r}, by = {_quoted(column)}, thresholds = {{ {keys} }} }}"


def _quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _order(dtype: pl.DataType) -> tuple[Any, Any]:
    """(key, value): the floats of the score's type as integers in the same order, and back."""
    kind, unsigned, bits = (np.float32, np.uint32, 32) if dtype == pl.Float32 else (np.float64, np.uint64, 64)
    sign = 1 << (bits - 1)
    full = (1 << bits) - 1

    def key(x: float) -> int:
        b = int(np.array([x], dtype=kind).view(unsigned)[0])
        return (~b & full) if b & sign else b | sign

    def value(k: int) -> float:
        b = k & ~sign if k & sign else ~k & full
        return float(np.array([b], dtype=unsigned).view(kind)[0])

    return key, value


def _max_ratio_thresholds(
    reps: Source, units: Units, k: int, ratio: float, dtype: pl.DataType, top_score: float
) -> list[float]:
    """Per-unit thresholds ("(other)" last) keeping every named unit's removal rate within
    [r / ratio, r x ratio] (r = 1 - k / candidates): one default, the highest value that keeps at
    least k rows once each unit's count is held inside its band, found by bisection over the
    score type's values in order (each step one count per unit); then a unit the default leaves
    outside its band gets its own threshold at the band's edge (its k-th highest score)."""
    r = 1 - k / sum(units.candidates)
    m = len(units.values)
    keep_lo = [math.ceil((1 - min(1.0, r * ratio)) * c - 1e-9) for c in units.candidates[:m]]
    keep_hi = [math.floor((1 - r / ratio) * c + 1e-9) for c in units.candidates[:m]]

    def counts(t: float) -> list[int]:
        cut = pl.lit(as_compared(t, dtype))

        def q(lf: pl.LazyFrame) -> pl.LazyFrame:
            kept = pl.col(SCORE).is_not_null() & (pl.col(SCORE) >= cut)
            return lf.group_by(units.index().alias(_UNIT)).agg(kept.sum().cast(pl.Int64).alias("kept"))

        got = dict(reps.collect({"k": (q, SumBy((_UNIT,)))})["k"].iter_rows())
        return [int(got.get(i, 0)) for i in [*range(m), -1]]

    def held(c: list[int]) -> int:
        return sum(min(max(x, lo), hi) for x, lo, hi in zip(c, keep_lo, keep_hi)) + c[-1]

    key, value = _order(dtype)
    lo, hi = key(-1.0), key(_above(top_score, dtype))  # every candidate kept at lo, none at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if held(counts(value(mid))) >= k:
            lo = mid
        else:
            hi = mid
    default = value(lo)
    at_default = counts(default)
    # a unit outside its band: pinned at the edge, as the rank of the score it keeps down to
    # (a rank 0 keeps nothing: just above the unit's highest score)
    edge = {}
    for i in range(m):
        if at_default[i] < keep_lo[i]:
            edge[i] = keep_lo[i]
        elif at_default[i] > keep_hi[i]:
            edge[i] = keep_hi[i]
    filters = units.filters()[:m]
    ranks = [[edge[i] or 1] if i in edge else [] for i in range(m)]
    stats = _kth_highest(reps, list(filters), ranks, list(units.candidates[:m]))
    out = []
    for i in range(m):
        if i not in edge:
            out.append(default)
        else:
            out.append(stats[i][0] if edge[i] else _above(stats[i][0], dtype))
    return [*out, default]


def tradeoff(
    reps: pl.LazyFrame | pl.DataFrame | Source,
    rows: pl.LazyFrame | pl.DataFrame | Source,
    column: str,
    targets: Sequence[float],
    *,
    score_dtype: pl.DataType = pl.Float32,
    top: int = TOP_UNITS,
    min_candidates: int = 30,
    max_ratio: float | None = None,
) -> dict[str, Any]:
    """For each target retention: the single threshold reaching it and what it does to each unit's
    removal rate, the thresholds that equalise the rates, and (max_ratio) the ones that keep every
    rate within that ratio of the overall (module doc). reps: the sweep's representatives (SCORE and
    `column`); rows: every row of the pool (`column`). A JSON-able dict."""
    if max_ratio is not None and not max_ratio >= 1:
        raise ValueError(f"--max-ratio {max_ratio}: a ratio of removal rates is >= 1 (1 = equal rates)")
    bad = [t for t in targets if not 0 < t <= 1]
    if bad:
        raise ValueError(f"target retention {bad[0]}: give a share of the pool's rows in (0, 1]")
    reps, rows = as_source(reps), as_source(rows)
    for src, what in ((reps, "representatives"), (rows, "rows")):
        if column not in src.schema().names():
            raise ValueError(f"trade-off by {column!r}: the {what} have no column {column!r}")
    dtype = score_dtype if score_dtype in (pl.Float32, pl.Float64) else pl.Float64
    units = units_of(reps, rows, column, top=top, min_candidates=min_candidates)
    rows_total, total_c = sum(units.rows_in), sum(units.candidates)
    out: dict[str, Any] = {
        "column": column,
        "rows_in": rows_total,
        "candidates": total_c,
        "max_retention": total_c / rows_total if rows_total else None,
        "units": [
            {"value": v, "candidates": c, "rows_in": r}
            for v, c, r in zip(units.labels, units.candidates, units.rows_in)
            if c or r
        ],
        "min_candidates": min_candidates,
        "max_ratio": max_ratio,
        "points": [],
    }
    if not total_c:
        out["note"] = "no candidates: every row is removed by another rule or has no score"
        return out
    m = len(units.values)
    asks = []  # (target, k, unit shares) of the feasible targets
    for target in sorted(set(float(t) for t in targets)):
        k = round(target * rows_total)
        if k > total_c:
            out["points"].append(
                {"target_retention": target, "keep": k, "feasible": False, "note": _infeasible(target, out)}
            )
            continue
        asks.append((target, k, _apportion(k, units.candidates)))
    if not asks:
        return out
    # one exact order-statistics request: per target, the overall k-th and each unit's share-th highest
    # score (the first highest too, for a share of 0: the threshold just above it)
    filters: list[pl.Expr | None] = [None, *units.filters()]
    want: list[set[int]] = [{1} | {k for _, k, _ in asks if k}] + [
        ({1} | {s[i] for _, _, s in asks if s[i]}) if units.candidates[i] else set() for i in range(m + 1)
    ]
    ks = [sorted(w) for w in want]
    stats = _kth_highest(reps, filters, ks, [total_c, *units.candidates])
    kth = [dict(zip(k_list, vals)) for k_list, vals in zip(ks, stats)]

    def at(f: int, k: int) -> float:
        return kth[f][k] if k else _above(kth[f][1], dtype)

    policies: dict[str, list[float]] = {}
    for target, k, shares in asks:
        policies[f"single:{target}"] = [at(0, k)] * (m + 1)
        policies[f"equalised:{target}"] = [
            at(i + 1, s) if units.candidates[i] else at(0, k) for i, s in enumerate(shares)
        ]
        if max_ratio is not None:
            policies[f"max_ratio:{target}"] = _max_ratio_thresholds(reps, units, k, max_ratio, dtype, kth[0][1])
    counted = _policies(reps, units, policies, dtype, rows_total)
    for target, k, _ in asks:
        point: dict[str, Any] = {"target_retention": target, "keep": k, "feasible": True}
        single = shortest(policies[f"single:{target}"][0], dtype)
        point["single"] = {"threshold": single, "spec": _spec_line(column, single, {}), **counted[f"single:{target}"]}
        for name in ("equalised", "max_ratio"):
            if f"{name}:{target}" not in policies:
                continue
            t = [shortest(x, dtype) for x in policies[f"{name}:{target}"]]
            # equalised: every named unit's threshold; max_ratio: those pinned away from the default
            named = {v: x for v, x in zip(units.values, t) if name == "equalised" or x != t[-1]}
            point[name] = {
                **({"ratio": max_ratio} if name == "max_ratio" else {}),
                "default": t[-1],
                "thresholds": named,
                "spec": _spec_line(column, t[-1], named),
                **counted[f"{name}:{target}"],
            }
        out["points"].append(point)
    out["points"].sort(key=lambda p: p["target_retention"])
    return out


def _infeasible(target: float, out: dict[str, Any]) -> str:
    return (
        f"retention {target:.1%} needs more rows than every other rule leaves: at most "
        f"{out['max_retention']:.1%} of the rows can be kept by any threshold"
    )


# --- text (curate sweep --equalize) ------------------------------------------------------------------


def tradeoff_lines(res: dict[str, Any]) -> list[str]:
    """The trade-off as `curate sweep --equalize` prints it."""
    col = res["column"]
    lines = [
        f"trade-off by {col}: {res['rows_in']:,} rows, {res['candidates']:,} candidates (rows every other rule keeps, "
        f"with a score: at most {_pct(res['max_retention'])} retention)",
        f"removal rate = share of a {col} group's candidates that the CLIP threshold removes; "
        f"{OTHER} = every other value and rows with none (min_score)",
    ]
    dup = res.get("duplicates")
    if dup is not None:
        spans = sum(dup["key_groups"].values())
        checked = ", ".join(dup["key_groups"]) or "no exact dedup"
        lines.append(
            f"exactness: {spans:,} duplicate key group(s) hold copies in two {col} groups ({checked})"
            + ("" if dup["checked"] else "; a near-duplicate dedup is on and is not checked")
            + (
                ": per-group thresholds may keep another copy than counted here; compare with curate select + curate diff"
                if spans
                else ""
            )
        )
    for p in res["points"]:
        lines.append("")
        lines.append(f"target retention {_pct(p['target_retention'])}: keep {p['keep']:,} rows")
        if not p["feasible"]:
            lines.append(f"  {p['note']}")
            continue
        base = p["single"]
        for name, title in (("single", "one threshold"), ("equalised", "equalised"), ("max_ratio", "max ratio")):
            pol = p.get(name)
            if pol is None:
                continue
            if name == "max_ratio":
                title = f"max ratio {pol['ratio']:g}"
            mean, base_mean = pol["score"]["mean"], base["score"]["mean"]
            delta = "" if name == "single" or mean is None or base_mean is None else f" ({mean - base_mean:+.4f})"
            lines.append(
                f"  {title}: {pol['spec']}\n    kept {pol['kept']:,} ({_pct(pol['retention'])}), CLIP removal "
                f"{_pct(pol['removal_rate'])}, mean score kept {_num(mean)}{delta}; group removal rates "
                f"{_pct(pol['rate_min'])} .. {_pct(pol['rate_max'])} (ratio {_num(pol['rate_ratio'], 2)})"
            )
            lines.append(f"    {col[:14]:<14} {'threshold':>11} {'candidates':>11} {'kept':>9} {'removal':>8}")
            for g in pol["groups"]:
                if not g["candidates"]:
                    continue
                lines.append(
                    f"    {g['value'][:14]:<14} {g['threshold']!r:>11} {g['candidates']:>11,} {g['kept']:>9,} "
                    f"{_pct(g['removal_rate']):>8}"
                )
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
