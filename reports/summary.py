"""The selection report: what one selection kept and removed, why, and for whom.

Everything here is polars group-by aggregation over the per-row decisions (lazy, run with the
streaming engine), so it works on tens of millions of rows without per-row Python. The result of
:func:`build_report` is a plain JSON-serialisable dict; :func:`write_report` writes it as
``report.json`` and, rendered by :mod:`curate.reports.html`, as ``report.html``.

Counting rules (the report's own definitions, checked by ``reconciles``):

* ``rows_in``  = every row; ``kept`` = rows with ``kept == True``; ``removed`` = rows with
  ``kept == False``. A row with a null ``kept`` is neither, so kept + removed != rows_in.
* ``removed_by_reason[r]`` = removed rows whose first failing rule (``reason``) is ``r``, for ``r`` in
  RULE_ORDER. A removed row with a null reason, or a reason outside RULE_ORDER, is counted as
  ``removed_unexplained``; then Σ removed_by_reason != removed.
* A slice (the whole selection, one shard, one group) *reconciles* iff kept + removed == rows_in and
  Σ removed_by_reason == removed. ``reconciles`` at the top is True iff the totals, every shard and
  every grouping (each group, and the groups summing to the totals) reconcile, and no kept row
  carries a reason. Nothing is dropped to make the numbers agree: a broken row shows up as a count.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import polars as pl

from curate.config import SelectionConfig
from curate.filters.rules import RULE_ORDER, reason_help
from curate.schema import (
    CLIP_SCORE,
    FETCH_STATUS,
    KEPT,
    REASON,
    REASONS,
    SHARD,
)
from curate import io
from curate.reports.groups import (  # noqa: F401 - the statistics are imported from here too
    Z95,
    Grouping,
    Setup,
    benjamini_hochberg,
    groupings,
    two_proportion_p,
    wilson_bounds,
)
from curate.reports import policy_net
from curate.reports.html import render_html
from curate.reports.sources import Source, SumBy, as_source, score_expr

REPORT_VERSION = 1
UNKNOWN = "(unknown)"  # how a null group value is shown
HIST_BINS = 20
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95}
DEFAULT_GROUP_COLUMNS = ("domain", "tld", "language")

_REASONS = [r.value for r in RULE_ORDER]


# --------------------------------------------------------------------------------------------------
# small numeric helpers


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for a binomial proportion; None when n == 0."""
    if n <= 0:
        return None
    lo, hi = wilson_bounds(successes, n, z)
    return [float(lo), float(hi)]


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _json_value(v: Any) -> Any:
    """A group value as JSON: str/int/bool/finite float as is, anything else as its str()."""
    if v is None:
        return UNKNOWN
    if isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# the aggregations


def _count_exprs(with_reasons: bool = False, order: Sequence[str] = _REASONS) -> list[pl.Expr]:
    """Per-slice counts: rows_in, kept, removed, removed_by_reason (one column per rule) and, with
    the ``reasons`` list, failed_any (``a:<rule>``, the rule's marginal effect: rows that fail it,
    whatever else they fail) and removed_only (``o:<rule>``: rows that this rule alone removes).
    order: the reasons, in order (a selection's reason_order: its concept:<name> reasons too)."""
    kept = pl.col(KEPT)
    removed = kept.not_()  # null kept -> null -> not counted anywhere but rows_in
    exprs = [
        pl.len().cast(pl.Int64).alias("rows_in"),
        kept.cast(pl.Int64).sum().alias("kept"),
        removed.cast(pl.Int64).sum().alias("removed"),
    ]
    for r in order:
        exprs.append((removed & (pl.col(REASON) == r)).cast(pl.Int64).sum().alias(f"r:{r}"))
    if with_reasons:
        rs = pl.col(REASONS)
        for r in order:
            exprs.append(rs.list.contains(r).cast(pl.Int64).sum().alias(f"a:{r}"))
            exprs.append(((rs.list.len() == 1) & (rs.list.first() == r)).cast(pl.Int64).sum().alias(f"o:{r}"))
    return exprs


def _check_columns(src: Source, group_cols: Sequence[str]) -> set[str]:
    names = set(src.schema().names())
    missing = [c for c in (SHARD, KEPT, REASON, *group_cols) if c not in names]
    if missing:
        raise ValueError(f"decisions frame lacks column(s) {missing}; it has {sorted(names)}")
    return names


def _count(keys: Sequence[str], exprs: list[pl.Expr]):
    """A grouped count query and how block answers merge (counts add up)."""
    return _count_query(*keys, exprs=exprs), SumBy(tuple(keys))


def _count_query(*keys: str, exprs: list[pl.Expr]):
    return lambda lf: lf.group_by(list(keys)).agg(exprs)


def report_tables(
    decisions: pl.LazyFrame | pl.DataFrame | Source,
    *,
    group_columns: Sequence[str] = DEFAULT_GROUP_COLUMNS,
    extra_group_columns: Sequence[str] = (),
    hist_bins: int = HIST_BINS,
    order: Sequence[str] = _REASONS,
) -> dict[str, pl.DataFrame]:
    """The report's raw tables, all small (one row per reason / shard / bin).

    Keys: ``kept_reason`` (kept, reason, n: every combination that occurs), ``failed_any``
    (one row, a column per rule), ``shards``, ``fetch_status`` (status, n), ``clip_stats`` (one
    row) and ``clip_hist`` (bin, lo, hi, n). Optional input columns (reasons, clip_score,
    fetch_status) that are absent give no table. `decisions` may be a frame or a source of frames
    (curate/reports/sources.py: the Ray engine's blocks); every table is a merge of counts, so both
    give the same tables. The per-group tables (one row per value of a grouping column: millions
    for domains) are not here: build_report computes them in parts (curate/reports/groups.py).
    """
    src = as_source(decisions)
    group_cols = list(dict.fromkeys([*group_columns, *extra_group_columns]))
    names = _check_columns(src, group_cols)

    n = pl.len().cast(pl.Int64).alias("n")
    queries: dict[str, tuple] = {}
    queries["kept_reason"] = _count([KEPT, REASON], [n])
    if REASONS in names:
        failed = [pl.col(REASONS).list.contains(r).cast(pl.Int64).sum().alias(r) for r in order]
        queries["failed_any"] = (lambda lf: lf.select(failed)), SumBy()
    queries["shards"] = _count([SHARD], _count_exprs(order=order))
    if FETCH_STATUS in names:
        queries["fetch_status"] = _count([FETCH_STATUS], [n])
    tables = src.collect(queries)

    if CLIP_SCORE in names:
        tables["clip_stats"] = src.scores(CLIP_SCORE, QUANTILES)
        st = tables["clip_stats"].row(0, named=True)
        lo, hi = _finite(st["min"]), _finite(st["max"])
        if lo is None or hi is None:
            tables["clip_hist"] = pl.DataFrame(
                schema={"bin": pl.Int64, "lo": pl.Float64, "hi": pl.Float64, "n": pl.Int64}
            )
        else:
            nb = hist_bins if hi > lo else 1
            width = (hi - lo) / nb if hi > lo else 1.0
            idx = ((score_expr(CLIP_SCORE) - lo) / width).floor().cast(pl.Int64).clip(0, nb - 1)
            counts = src.collect(
                {
                    "hist": (
                        lambda lf: lf.select(idx.alias("bin")).drop_nulls().group_by("bin").agg(n),
                        SumBy(("bin",)),
                    )
                }
            )["hist"]
            full = pl.DataFrame(
                {
                    "bin": list(range(nb)),
                    "lo": [lo + i * width for i in range(nb)],
                    "hi": [hi if i == nb - 1 else lo + (i + 1) * width for i in range(nb)],
                }
            )
            tables["clip_hist"] = (
                full.join(counts, on="bin", how="left").with_columns(pl.col("n").fill_null(0)).sort("bin")
            )
    return tables


# --------------------------------------------------------------------------------------------------
# tables -> JSON


def _slice_record(row: dict[str, Any]) -> dict[str, Any]:
    rows_in, kept, removed = int(row["rows_in"]), int(row["kept"] or 0), int(row["removed"] or 0)
    by_reason = {k[2:]: int(v or 0) for k, v in row.items() if k[:2] == "r:"}  # every reason counted, in order
    explained = sum(by_reason.values())
    return {
        "rows_in": rows_in,
        "kept": kept,
        "removed": removed,
        "removal_rate": _rate(removed, rows_in),
        "removed_by_reason": by_reason,
        "removed_unexplained": removed - explained,
        "kept_null": rows_in - kept - removed,
        "reconciles": kept + removed == rows_in and explained == removed,
    }


def _nan_none(x: Any) -> float | None:
    return None if x is None else _finite(x)


def _group_section(
    g: Grouping, *, overall_rate: float | None, min_group_size: int, totals: dict[str, int]
) -> tuple[dict[str, Any], list[str]]:
    """The report's section of one grouping: its counts of groups, the shown groups (the largest
    top_groups, then up to top_groups more flagged ones, most significant first, so that a
    significant small group is never hidden in the rollup) in the table's order, and the rollup
    row of all the other groups (every group's sums minus the shown ones'), so that the rows add up
    to the totals. The full table stays in g.table (curate/reports/groups.py)."""
    problems: list[str] = []
    column = g.column
    counts = ["rows_in", "kept", "removed", *(c for c in g.sums if c[:2] == "r:")]
    extra = [c for c in g.sums if c[:2] in ("a:", "o:")]
    order = [c[2:] for c in g.sums if c[:2] == "a:"]
    if g.broken:
        b = {"value": _json_value(g.broken_first["value"][0]), **_slice_record(g.broken_first.row(0, named=True))}
        problems.append(
            f"{column}: {g.broken} group(s) do not reconcile, e.g. {b['value']!r} "
            f"(rows_in {b['rows_in']}, kept {b['kept']}, removed {b['removed']}, "
            f"unexplained removals {b['removed_unexplained']})"
        )
    for k in ("rows_in", "kept", "removed"):
        if g.sums[k] != totals[k]:
            problems.append(f"{column}: groups sum to {k}={g.sums[k]}, totals say {totals[k]}")

    shown = []
    for row in g.shown.iter_rows(named=True):
        rec = {
            "value": _json_value(row["value"]),
            "unknown": row["value"] is None,
            "other_groups": 0,
            **_slice_record(row),
        }
        rec["rest_rate"] = _nan_none(row["rest_rate"])
        rec["p_value"] = _nan_none(row["p_value"])
        rec["q_value"] = _nan_none(row["q_value"])
        rec["significant"] = bool(row["significant"])
        rec["direction"] = row["direction"]
        if extra:
            rec["failed_any"] = {r: int(row[f"a:{r}"]) for r in order}
            rec["removed_only"] = {r: int(row[f"o:{r}"]) for r in order}
        shown.append(rec)
    others = g.distinct - g.shown.height
    if others:
        rest = {c: g.sums[c] - int(g.shown[c].sum()) for c in (*counts, *extra)}
        agg = _slice_record(rest)
        broken_shown = sum(not r["reconciles"] for r in shown)
        agg["reconciles"] = agg["reconciles"] and g.broken == broken_shown  # no broken group rolled up
        rec = {"value": f"(other {others} groups)", "unknown": False, "other_groups": others, **agg}
        rec.update(rest_rate=None, p_value=None, q_value=None, significant=False, direction=None)
        if extra:
            rec["failed_any"] = {r: rest[f"a:{r}"] for r in order}
            rec["removed_only"] = {r: rest[f"o:{r}"] for r in order}
        shown.append(rec)

    out = []
    for rec in shown:
        rec["ci95"] = wilson_interval(rec["removed"], rec["rows_in"])
        rate = rec["removal_rate"]
        rec["ratio_to_overall"] = (rate / overall_rate) if (rate is not None and overall_rate) else None
        rec["too_small"] = rec["rows_in"] < min_group_size
        out.append(_order_group(rec))
    return (
        {
            "column": column,
            "distinct": g.distinct,
            "shown": g.shown.height,
            "too_small_groups": g.too_small,
            "tested_groups": g.distinct - g.too_small,
            "flagged_groups": g.flagged,
            "flagged_higher": g.flagged_higher,
            "flagged_lower": g.flagged_lower,
            "reconciles": not problems,
            "rows": out,
        },
        problems,
    )


_GROUP_KEYS = (
    "value", "unknown", "other_groups", "rows_in", "kept", "removed", "removal_rate", "ci95",
    "ratio_to_overall", "rest_rate", "p_value", "q_value", "significant", "direction", "too_small",
    "removed_by_reason", "failed_any", "removed_only", "removed_unexplained", "kept_null", "reconciles",
)  # fmt: skip


def _order_group(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in _GROUP_KEYS if k in rec}


def build_report(
    decisions: pl.LazyFrame | pl.DataFrame | Source,
    *,
    group_columns: Sequence[str] = DEFAULT_GROUP_COLUMNS,
    extra_group_columns: Sequence[str] = (),
    min_group_size: int = 30,
    top_groups: int = 25,
    meta: dict | None = None,
    alpha: float = 0.05,
    return_tables: bool = False,
    selection: SelectionConfig | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
    """Summarise one selection's per-row decisions as a JSON-serialisable dict (see module doc).

    Each grouping that a rule targets by design (the language rule: `language`; a per-group CLIP
    threshold: its column; curate/reports/policy_net.py) also gets its net-of-policy view,
    ``groups[<column>]["policy"]``: the same statistics over the rows that pass those rules, and the
    rows they exclude (``excluded_by_policy``, also on each group of the grouping). `selection`: the
    rules the decisions were made with (what the spec makes a rule target); None: the registry's.

    With ``return_tables`` also returns the machine tables keyed by name: polars DataFrames, and
    per grouping ``groups_<column>``, every group with its statistics (not only the shown ones), as
    a curate.reports.groups.GroupTable: in parts where they were computed (the Ray engine's tasks;
    one part here for a frame), written by tasks (curate.reports.audit.write_tables)."""
    if top_groups < 1:
        raise ValueError("top_groups must be >= 1")
    group_cols = list(dict.fromkeys([*group_columns, *extra_group_columns]))
    src = as_source(decisions)
    helps = reason_help(selection)  # every reason the selection can give (its concepts too), in order
    order = list(helps)
    tables = report_tables(src, group_columns=group_cols, order=order)
    problems: list[str] = []

    # ---- totals and first reasons, from the (kept, reason) table ---------------------------------
    kr = tables["kept_reason"]
    rows_in = int(kr["n"].sum())
    kept = int(kr.filter(pl.col(KEPT) == True)["n"].sum())  # noqa: E712
    removed = int(kr.filter(pl.col(KEPT) == False)["n"].sum())  # noqa: E712
    kept_null = rows_in - kept - removed
    rem = kr.filter(pl.col(KEPT) == False)  # noqa: E712
    first = {r: int(rem.filter(pl.col(REASON) == r)["n"].sum()) for r in order}
    removed_no_reason = int(rem.filter(pl.col(REASON).is_null())["n"].sum())
    unknown_reasons = {
        str(row[REASON]): int(row["n"])
        for row in rem.filter(pl.col(REASON).is_not_null() & ~pl.col(REASON).is_in(order))
        .sort("n", descending=True)
        .iter_rows(named=True)
    }
    kept_with_reason = int(kr.filter((pl.col(KEPT) == True) & pl.col(REASON).is_not_null())["n"].sum())  # noqa: E712

    if kept_null:
        problems.append(f"{kept_null:,} row(s) have a null 'kept': neither kept nor removed")
    if removed_no_reason:
        problems.append(f"{removed_no_reason:,} removed row(s) have no reason")
    if unknown_reasons:
        problems.append(
            f"{sum(unknown_reasons.values()):,} removed row(s) have a reason outside RULE_ORDER: "
            + ", ".join(f"{k!r} ({v:,})" for k, v in list(unknown_reasons.items())[:5])
        )
    if kept_with_reason:
        problems.append(f"{kept_with_reason:,} kept row(s) carry a removal reason")
    totals_ok = kept + removed == rows_in and sum(first.values()) == removed

    totals = {
        "rows_in": rows_in,
        "kept": kept,
        "removed": removed,
        "removal_rate": _rate(removed, rows_in),
        "kept_rate": _rate(kept, rows_in),
        "reconciles": totals_ok,
    }
    overall_rate = totals["removal_rate"]

    failed_any = tables["failed_any"].row(0, named=True) if "failed_any" in tables else None
    reasons = []
    for r in order:
        fa = int(failed_any[r] or 0) if failed_any is not None else None
        reasons.append(
            {
                "reason": r,
                "removed_first": first[r],
                "removed_first_share": _rate(first[r], rows_in),
                "share_of_removed": _rate(first[r], removed),
                "failed_any": fa,
                "failed_any_share": _rate(fa, rows_in) if fa is not None else None,
                "help": helps[r],
            }
        )

    anomalies = {
        "kept_null": kept_null,
        "removed_without_reason": removed_no_reason,
        "removed_unknown_reason": unknown_reasons,
        "kept_with_reason": kept_with_reason,
    }

    # ---- shards ------------------------------------------------------------------------------------
    shards = []
    for row in tables["shards"].sort(SHARD, nulls_last=True).iter_rows(named=True):
        shards.append({"shard": _json_value(row[SHARD]), **_slice_record(row)})
    bad_shards = [s["shard"] for s in shards if not s["reconciles"]]
    if bad_shards:
        problems.append(
            f"{len(bad_shards)} shard(s) do not reconcile: "
            + ", ".join(map(str, bad_shards[:10]))
            + (" ..." if len(bad_shards) > 10 else "")
        )
    for k in ("rows_in", "kept", "removed"):
        s = sum(x[k] for x in shards)
        if s != totals[k]:
            problems.append(f"shards sum to {k}={s}, totals say {totals[k]}")

    # ---- groups ------------------------------------------------------------------------------------
    # every value of every grouping, in parts (a grouping can have millions of values): the
    # driver gets the shown groups and the sums back, the full tables stay in their parts
    names = set(src.schema().names())
    exprs = _count_exprs(REASONS in names, order)
    targets = policy_net.targeting(group_cols, selection)
    # groupings with a targeting rule that fails some row: their rows' excluded count, and a net view
    nets = policy_net.active(targets, failed_any or {}) if REASONS in names else {}
    net_query = {c: (_select_query(policy_net.net_count_exprs(r, order)), SumBy()) for c, r in nets.items()}
    net_totals = src.collect(net_query) if nets else {}  # the passing rows' totals: each net view's "rest"
    queries = {c: (_count_query(c, exprs=[*exprs, *_excluded_count(nets.get(c))]), c) for c in group_cols}
    queries.update(
        {
            policy_net.net_name(c): (_count_query(c, exprs=policy_net.net_count_exprs(r, order)), c)
            for c, r in nets.items()
        }
    )
    counts = src.partitioned(queries)
    setup = Setup(
        counts=("rows_in", "kept", "removed", *(f"r:{r}" for r in order)),
        extra=tuple(e.meta.output_name() for e in exprs if e.meta.output_name()[:2] in ("a:", "o:")),
        tot_n=rows_in,
        tot_x=removed,
        min_group_size=min_group_size,
        alpha=alpha,
        top=top_groups,
    )
    schema = src.schema()
    setups = {c: replace(setup, extra=(*setup.extra, policy_net.EXCLUDED)) if c in nets else setup for c in group_cols}
    net_sums = {c: net_totals[c].row(0, named=True) for c in nets}
    for c in nets:
        setups[policy_net.net_name(c)] = replace(
            setup,
            extra=(policy_net.EXCLUDED,),
            tot_n=int(net_sums[c]["rows_in"] or 0),
            tot_x=int(net_sums[c]["removed"] or 0),
        )
    dtypes = {name: schema[q[1]] for name, q in queries.items()}
    groups = {}
    full_tables: dict[str, Any] = {}
    done = groupings(counts, setups, dtypes)
    for c in group_cols:
        g = done[c]
        sec, probs = _group_section(g, overall_rate=overall_rate, min_group_size=min_group_size, totals=totals)
        groups[c] = sec
        full_tables[f"groups_{c}"] = g.table  # a GroupTable: written in parts by write_tables
        problems.extend(probs)
        sec["policy"] = None
        if c in nets:
            net = done[policy_net.net_name(c)]
            sec["policy"], probs = _policy_section(
                c, nets[c], sec["rows"], g, net, net_sums[c], rows_in, min_group_size
            )
            full_tables[policy_net.table_name(c)] = net.table  # every group's net numbers, in parts
            problems.extend(probs)
    if CLIP_SCORE in names and group_cols:
        dists = _clip_by_group(src, groups)
        for c, d in dists.items():
            full_tables[f"clip_by_{c}"] = d
            byval = {(None if r[c] is None else r[c]): r for r in d.iter_rows(named=True)}
            for g in groups[c]["rows"]:
                if g["other_groups"]:
                    continue
                r = byval.get(None if g["unknown"] else g["value"])
                g["clip_score"] = (
                    None
                    if r is None
                    else {
                        "scored": int(r["scored"]),
                        "mean": _finite(r["mean"]),
                        **{k: _finite(r[k]) for k in QUANTILES},
                    }
                )

    # ---- clip score ----------------------------------------------------------------------------------
    clip = None
    if "clip_stats" in tables:
        st = tables["clip_stats"].row(0, named=True)
        hist = tables["clip_hist"]
        clip = {
            "scored": int(st["scored"]),
            "null": int(st["rows"]) - int(st["scored"]),
            "min": _finite(st["min"]),
            "max": _finite(st["max"]),
            "mean": _finite(st["mean"]),
            "quantiles": {k: _finite(st[k]) for k in QUANTILES},
            "histogram": {
                "edges": (hist["lo"].to_list() + hist["hi"].tail(1).to_list()) if hist.height else [],
                "counts": [int(x) for x in hist["n"].to_list()],
            },
        }

    fetch = None
    if "fetch_status" in tables:
        fetch = {
            str(_json_value(row[FETCH_STATUS])): int(row["n"])
            for row in tables["fetch_status"].sort(["n", FETCH_STATUS], descending=[True, False]).iter_rows(named=True)
        }

    reconciles = totals_ok and not problems
    rep = {
        "report_version": REPORT_VERSION,
        "meta": dict(meta or {}),
        "reconciles": reconciles,
        "problems": problems,
        "totals": totals,
        "anomalies": anomalies,
        "reasons": reasons,
        "shards": shards,
        "groups": groups,
        "clip_score": clip,
        "fetch_status": fetch,
        "settings": {
            "group_columns": group_cols,
            "min_group_size": min_group_size,
            "top_groups": top_groups,
            "ci": "Wilson score interval, 95%",
            "test": "two-sided pooled two-proportion z-test, group vs the rest of the rows; "
            "Benjamini-Hochberg across the groups of each grouping with at least min_group_size rows",
            "alpha": alpha,
            "policy_targets": {c: list(r) for c, r in targets.items() if r},
            "disparities_lead": policy_net.LEAD_VIEW,
            "net_of_policy": "for a grouping that a rule targets by design (it reads the grouping's column: the "
            "language rule for language, a per-group CLIP threshold for its column), the same statistics over the "
            "rows that pass those rules; rows failing one are excluded by policy, whatever rule removed them first",
        },
    }
    if not return_tables:
        return rep
    full_tables["totals"] = pl.DataFrame([{k: v for k, v in totals.items()}])
    full_tables["reasons"] = pl.DataFrame(reasons)
    full_tables["shards"] = tables["shards"].sort(SHARD, nulls_last=True)
    return rep, full_tables


def _select_query(exprs: list[pl.Expr]):
    return lambda lf: lf.select(exprs)


def _excluded_count(reasons: Sequence[str] | None) -> list[pl.Expr]:
    """For a grouping with a net view: the count of each group's rows that a targeting rule fails."""
    if not reasons:
        return []
    return [policy_net.excluded(reasons).cast(pl.Int64).sum().alias(policy_net.EXCLUDED)]


def _with_excluded(rows: list[dict[str, Any]], g: Grouping) -> None:
    """Each shown group's rows excluded by policy (g.shown's column), and the rollup's (the rest)."""
    shown = [int(x) for x in g.shown[policy_net.EXCLUDED].to_list()]
    for rec, x in zip(rows, shown):
        rec[policy_net.EXCLUDED] = x
    if len(rows) > len(shown):
        rows[-1][policy_net.EXCLUDED] = g.sums[policy_net.EXCLUDED] - sum(shown)


def _policy_section(
    column: str,
    reasons: Sequence[str],
    rows: list[dict[str, Any]],
    g: Grouping,
    net: Grouping,
    net_sums: dict[str, Any],
    rows_in: int,
    min_group_size: int,
) -> tuple[dict[str, Any], list[str]]:
    """A grouping's policy part: the rules that target it, what they exclude, and its groups among
    the rows that pass them (a section like the grouping's own, its totals those rows' totals).
    `rows`: the grouping's own shown rows (all rows), which get their excluded counts from `g`."""
    sums = {k: int(v or 0) for k, v in net_sums.items()}
    pol = policy_net.summary(reasons, sums, rows_in, net.empty)
    sec, problems = _group_section(
        net, overall_rate=pol["totals"]["removal_rate"], min_group_size=min_group_size, totals=sums
    )
    sec["column"] = column
    _with_excluded(sec["rows"], net)
    _with_excluded(rows, g)
    for name, got in ((net.column, net.sums[policy_net.EXCLUDED]), (column, g.sums[policy_net.EXCLUDED])):
        if got != pol["excluded_rows"]:
            problems.append(f"{name}: groups sum to {policy_net.EXCLUDED}={got}, totals say {pol['excluded_rows']}")
    if sums["rows_in"] + pol["excluded_rows"] != rows_in:
        problems.append(
            f"{net.column}: {sums['rows_in']} rows pass the policy + {pol['excluded_rows']} excluded != {rows_in} rows in"
        )
    sec["reconciles"] = not problems
    return {**pol, "net": sec}, problems


def _clip_by_group(src: Source, groups: dict[str, dict[str, Any]]) -> dict[str, pl.DataFrame]:
    """CLIP score distribution (count, mean, quantiles) of the shown groups of every grouping."""
    out = {}
    for c, sec in groups.items():
        values = [None if g["unknown"] else g["value"] for g in sec["rows"] if not g["other_groups"]]
        out[c] = src.scores(CLIP_SCORE, QUANTILES, by=c, values=values)
    return out


# --------------------------------------------------------------------------------------------------
# writing


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write ``report.json`` and ``report.html`` under out_dir (a local path or any fsspec URL).

    The HTML is written first, so a present report.json means both are complete. Returns the two
    paths as given (out_dir joined with the file name)."""
    out = os.fspath(out_dir)
    public = {k: v for k, v in report.items() if not k.startswith("_")}  # e.g. _thumbs: HTML only
    body = json.dumps(public, indent=2, allow_nan=False, ensure_ascii=False).encode("utf-8")
    page = render_html(report).encode("utf-8")
    html_path, json_path = io.join(out, "report.html"), io.join(out, "report.json")
    io.atomic_write_bytes(html_path, page)
    io.atomic_write_bytes(json_path, body)
    return json_path, html_path


__all__: Iterable[str] = [
    "build_report",
    "report_tables",
    "write_report",
    "wilson_interval",
    "UNKNOWN",
]
