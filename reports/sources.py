"""Where the report's numbers are computed: one frame in this process (FrameSource: the local
engine), or frames spread over the blocks of a Ray selection (BlockSource: each question runs as a
task where its block lies, and only the small answers come back to be merged). The report code
(curate/reports/summary.py, sweep.py, audit.py) asks every question through this interface, so
both engines answer with the same code:

  collect   named queries (a function LazyFrame -> LazyFrame) with how their block answers merge:
            SumBy(keys) (counts: concatenated and summed per key, exact) or Head(by, descending, n)
            (the first n rows in an order: each block's first n, then the first n of those, exact)
  scores    count, min, max, mean and quantiles of a score column, overall or per group value.
            Blocks: counts, min and max merge exactly; quantiles are exact order statistics (a
            radix select over the blocks, curate/exact_rank.py) with polars' own interpolation; the
            mean is the merged sum over the merged count, equal to polars' up to the order of the
            float additions.

The driver holds the answers only: O(groups + thresholds + samples), never O(rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate import exact_rank
from curate.executor import Executor, Resources

Query = Callable[[pl.LazyFrame], pl.LazyFrame]
TASK = Resources(cpus=1)
FOLD_EVERY = 16  # block answers held before they are folded into the running result


@dataclass(frozen=True)
class SumBy:
    """Block answers are counts: concatenate, sum every other column per `keys` (none: one row)."""

    keys: tuple[str, ...] = ()

    def merge(self, parts: list[pl.DataFrame]) -> pl.DataFrame:
        frame = pl.concat(parts)
        if not self.keys:
            return frame.select(pl.all().sum())
        return frame.group_by(list(self.keys)).agg(pl.all().sum())


@dataclass(frozen=True)
class Head:
    """Block answers are each block's first n rows in this order: the first n of them all."""

    by: tuple[str, ...]
    descending: tuple[bool, ...]
    n: int

    def merge(self, parts: list[pl.DataFrame]) -> pl.DataFrame:
        return pl.concat(parts).sort(list(self.by), descending=list(self.descending)).head(self.n)


@dataclass(frozen=True)
class Agg:
    """Block answers are one row each: these expressions over all of them (e.g. min of mins)."""

    exprs: tuple[pl.Expr, ...]

    def merge(self, parts: list[pl.DataFrame]) -> pl.DataFrame:
        return pl.concat(parts).select(list(self.exprs))


Merge = SumBy | Head | Agg


def score_expr(column: str) -> pl.Expr:
    """A score as the report reads it: float64, NaN as no score."""
    return pl.col(column).cast(pl.Float64).fill_nan(None)


def _group_filter(column: str, value: Any) -> pl.Expr:
    return pl.col(column).is_null() if value is None else pl.col(column) == value


class FrameSource:
    """One frame in this process (the local engine)."""

    def __init__(self, frame: pl.LazyFrame | pl.DataFrame):
        self.frame = frame.lazy()

    def schema(self) -> pl.Schema:
        return self.frame.collect_schema()

    def collect(self, queries: dict[str, tuple[Query, Merge]]) -> dict[str, pl.DataFrame]:
        keys = list(queries)
        frames = pl.collect_all([queries[k][0](self.frame) for k in keys], engine="streaming")
        return dict(zip(keys, frames))

    def scores(
        self,
        column: str,
        quantiles: dict[str, float],
        interpolation: str = "linear",
        by: str | None = None,
        values: Sequence[Any] = (),
    ) -> pl.DataFrame:
        """Overall (by None): one row of rows, scored, min, max, mean and the quantiles. Per
        group: a row per value of `values` present (by, scored, mean, quantiles)."""
        s = score_expr(column)
        # nulls dropped first: with nulls present polars offsets the rank by the null count, and the
        # interpolation weight then differs in the last bits from the same values without them
        qs = [s.drop_nulls().quantile(q, interpolation=interpolation).alias(k) for k, q in quantiles.items()]
        if by is None:
            return self.frame.select(
                pl.len().cast(pl.Int64).alias("rows"),
                s.count().cast(pl.Int64).alias("scored"),
                s.min().alias("min"),
                s.max().alias("max"),
                s.mean().alias("mean"),
                *qs,
            ).collect(engine="streaming")
        return (
            self.frame.filter(_in_values(by, values, self.schema()))
            .group_by(by)
            .agg(s.count().cast(pl.Int64).alias("scored"), s.mean().alias("mean"), *qs)
            .collect(engine="streaming")
        )


def _in_values(column: str, values: Sequence[Any], schema: pl.Schema) -> pl.Expr:
    vals = [v for v in values if v is not None]
    keep = pl.col(column).is_in(pl.Series(vals).cast(schema[column], strict=False)) if vals else pl.lit(False)
    if any(v is None for v in values):
        keep = keep | pl.col(column).is_null()
    return keep


# --- blocks on an executor ----------------------------------------------------------------------------


def _answer(frame: pl.DataFrame, queries: list[Query]) -> list[pl.DataFrame]:
    """One block's answers to a batch of queries (a task)."""
    lf = frame.lazy()
    return pl.collect_all([q(lf) for q in queries])


def _count_keys(
    frame: pl.DataFrame, column: str, filters: list[pl.Expr | None], asks: list[tuple[int, int, int]], width: int
) -> list[exact_rank.Counts]:
    """One block's counts for one radix-select pass of several selections (a task): per ask
    (filter index, prefix, done), the sparse counts of the filtered scores' next `width` bits."""
    keys: dict[int, np.ndarray] = {}
    for f in {a[0] for a in asks}:
        sub = frame if filters[f] is None else frame.filter(filters[f])
        vals = sub.select(score_expr(column)).to_series().drop_nulls().to_numpy()
        keys[f] = exact_rank.order_keys(vals)
    return [exact_rank.pass_counts(keys[f], prefix, done, width) for f, prefix, done in asks]


def quantile_ranks(n: int, q: float, interpolation: str) -> list[tuple[int, float]]:
    """The ascending ranks a quantile reads and their weights, as polars computes it: linear reads
    floor and ceil of (n - 1) q; nearest reads floor((n - 1) q + 0.5)."""
    f = (n - 1) * q
    if interpolation == "nearest":
        return [(int(math.floor(f + 0.5)), 1.0)]
    if interpolation != "linear":
        raise ValueError(f"interpolation {interpolation!r}: linear or nearest")
    lo, hi = math.floor(f), math.ceil(f)
    return [(lo, f - lo), (hi, 0.0)] if hi != lo else [(lo, 0.0)]


def quantile_value(order_stats: list[float], ranks: list[tuple[int, float]]) -> float:
    """polars' value from the order statistics quantile_ranks asked for."""
    if len(order_stats) == 1:
        return order_stats[0]
    lower, upper = order_stats
    if lower == upper:
        return lower
    return ranks[0][1] * (upper - lower) + lower


def frame_schema(frame: pl.DataFrame) -> pl.Schema:
    return frame.schema


class BlockSource:
    """Frames that live on an executor, one per block (futures): the Ray engine's decided rows,
    or its representatives. Questions run as tasks on the blocks; the driver merges answers."""

    def __init__(self, executor: Executor, blocks: list[Any], schema: pl.Schema | None = None):
        if schema is None:  # one small task: the frames stay where they are
            schema = executor.result(executor.submit(frame_schema, blocks[0], resources=TASK))
        self.executor, self.blocks, self._schema = executor, blocks, schema

    def schema(self) -> pl.Schema:
        return self._schema

    def _fold(self, fn, args: tuple, merges: list[Callable[[list[Any]], Any]]) -> list[Any]:
        """fn(block, *args) on every block, each returning one answer per merge; the answers are
        folded into the running result as they arrive (at most FOLD_EVERY held), so the driver
        holds one merged answer, not one per block."""
        ex = self.executor
        pending = [ex.submit(fn, b, *args, resources=TASK) for b in self.blocks]
        acc: list[Any] | None = None
        held: list[list[Any]] = []
        while pending:
            fut = ex.wait_first(pending)
            pending.remove(fut)
            held.append(ex.result(fut))
            if len(held) >= FOLD_EVERY or not pending:
                parts = held if acc is None else [acc, *held]
                acc = [m([p[i] for p in parts]) for i, m in enumerate(merges)]
                held = []
        return acc or []

    def collect(self, queries: dict[str, tuple[Query, Merge]]) -> dict[str, pl.DataFrame]:
        keys = list(queries)
        merged = self._fold(_answer, ([queries[k][0] for k in keys],), [queries[k][1].merge for k in keys])
        return dict(zip(keys, merged))

    def order_stats(self, column: str, filters: list[pl.Expr | None], ranks_of) -> tuple[list[int], list[list[float]]]:
        """(scored rows per filter, the order statistics asked for): ranks_of(n per filter) gives,
        per filter, the ascending ranks wanted. All selections advance together, one wave of tasks
        per pass (len(exact_rank.PASS_BITS) passes)."""
        width0 = exact_rank.PASS_BITS[0]
        first_asks = [(f, 0, 0) for f in range(len(filters))]
        first = self._fold(_count_keys, (column, filters, first_asks, width0), [exact_rank.merge] * len(filters))
        n = [int(c[1].sum()) for c in first]
        wanted = ranks_of(n)
        # one selection per (filter, rank): k counts from the top, as exact_rank picks
        sels = [[f, n[f] - 1 - r, 0, 0] for f in range(len(filters)) for r in wanted[f]]
        for s in sels:
            b, s[1] = exact_rank.pick(first[s[0]], s[1])
            s[2], s[3] = b, width0
        for width in exact_rank.PASS_BITS[1:]:
            asks = sorted({(s[0], s[2], s[3]) for s in sels})
            index = {a: i for i, a in enumerate(asks)}
            merged = self._fold(_count_keys, (column, filters, asks, width), [exact_rank.merge] * len(asks))
            for s in sels:
                b, s[1] = exact_rank.pick(merged[index[(s[0], s[2], s[3])]], s[1])
                s[2], s[3] = (s[2] << width) | b, s[3] + width
        values = iter(exact_rank.key_value(s[2]) for s in sels)
        return n, [[next(values) for _ in wanted[f]] for f in range(len(filters))]

    def scores(
        self,
        column: str,
        quantiles: dict[str, float],
        interpolation: str = "linear",
        by: str | None = None,
        values: Sequence[Any] = (),
    ) -> pl.DataFrame:
        s = score_expr(column)
        partial = [s.count().cast(pl.Int64).alias("scored"), s.sum().alias("_sum")]
        if by is None:
            merged = (
                pl.col("rows").sum(),
                pl.col("scored").sum(),
                pl.col("_sum").sum(),
                pl.col("min").min(),
                pl.col("max").max(),
            )
            groups = self.collect(
                {
                    "n": (
                        lambda lf: lf.select(
                            pl.len().cast(pl.Int64).alias("rows"), *partial, s.min().alias("min"), s.max().alias("max")
                        ),
                        Agg(merged),
                    )
                }
            )["n"]
            filters: list[pl.Expr | None] = [None]
        else:
            groups = self.collect(
                {
                    "g": (
                        lambda lf: lf.filter(_in_values(by, values, lf.collect_schema())).group_by(by).agg(*partial),
                        SumBy((by,)),
                    )
                }
            )["g"]
            filters = [_group_filter(by, v) for v in groups[by].to_list()]
        ranks = {k: [] for k in quantiles}

        def ranks_of(ns: list[int]) -> list[list[int]]:
            out = []
            for n in ns:
                want: list[int] = []
                for k, q in quantiles.items():
                    r = quantile_ranks(n, q, interpolation) if n else []
                    ranks[k].append(r)
                    want += [i for i, _ in r]
                out.append(want)
            return out

        ns, stats = self.order_stats(column, filters, ranks_of)
        qcols: dict[str, list[float | None]] = {k: [] for k in quantiles}
        for f, got in enumerate(stats):
            it = iter(got)
            for k in quantiles:
                r = ranks[k][f]
                qcols[k].append(quantile_value([next(it) for _ in r], r) if r else None)
        out = groups.with_columns(
            pl.when(pl.col("scored") > 0).then(pl.col("_sum") / pl.col("scored")).alias("mean"),
            *(pl.Series(k, v, dtype=pl.Float64) for k, v in qcols.items()),
        ).drop("_sum")
        if by is None:
            return out.select("rows", "scored", "min", "max", "mean", *quantiles)
        return out.select(by, "scored", "mean", *quantiles)


Source = FrameSource | BlockSource


def as_source(frame: pl.LazyFrame | pl.DataFrame | Source) -> Source:
    return frame if isinstance(frame, (FrameSource, BlockSource)) else FrameSource(frame)
