"""Where the report's numbers are computed: one frame in this process (FrameSource: the local
engine), or frames spread over the blocks of a Ray selection (BlockSource: each question runs as a
task where its block lies, and only the small answers come back to be merged). The report code
(curate/reports/summary.py, sweep.py, audit.py) asks every question through this interface, so
both engines answer with the same code:

  collect   named queries (a function LazyFrame -> LazyFrame) with how their block answers merge:
            SumBy(keys) (counts: concatenated and summed per key, exact) or Head(by, descending, n)
            (the first n rows in an order: each block's first n, then the first n of those, exact)
  partitioned  grouped counts kept out of this process: every value's counts summed in one of P
            parts (a hash of the value picks the part), each part a future of the executor it
            returns, for tasks to work on (curate/reports/groups.py: the per-group tables, which
            can have millions of rows). A frame is one part, on an in-process executor.
  scores    count, min, max, mean and quantiles of a score column, overall or per group value.
            Blocks: counts, min and max merge exactly; quantiles are exact order statistics (a
            radix select over the blocks, curate/exact_rank.py) with polars' own interpolation; the
            mean is the merged sum over the merged count, equal to polars' up to the order of the
            float additions.

The driver holds the answers only: O(shown groups + thresholds + samples), never O(rows); a
grouping's full table stays in its parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate import exact_rank
from curate.executor import Executor, Future, LocalExecutor, Resources

Query = Callable[[pl.LazyFrame], pl.LazyFrame]
TASK = Resources(cpus=1)
# block answers held before they are folded into the running result: the driver holds this many
# plus the result. An answer can be large (a radix pass's sparse counts for every shown group: up to
# ~20 k bins each), and with 16 the driver's peak grew with the blocks up to 16 of them (bench:
# docs/SCALE.md); folding is cheap next to the tasks
FOLD_EVERY = 2
HASH_SEED = 0x5EED  # which part a value's counts go to (polars' hash: stable within one polars version)
ROWS_PER_PART = 1_000_000  # block answer rows a part's reducer sums (about: measured per grouping)
PARTS_MAX = 256  # parts per grouping, at most (blocks x parts objects per grouping)
# block answer rows per object of the shuffle, on average, at least (~100 KiB): Ray keeps a task's
# smaller returns in the driver's memory (inlined) until the task that reads them has run
OBJECT_ROWS = 512


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


def _hash_key(key: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The hash that picks a value's part: of the value itself (a categorical as its string: its
    codes can differ from block to block)."""
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        key = key.cast(pl.String)
    return key.hash(HASH_SEED)


def part_index(values: pl.Series, parts: int) -> np.ndarray:
    """The part (0 .. parts-1) each value's counts are in: the same hash as the split of the counts."""
    return (pl.select(_hash_key(pl.lit(values), values.dtype) % parts).to_series().to_numpy()).astype(np.int64)


def split_by_hash(frame: pl.DataFrame, key: str, parts: int) -> list[pl.DataFrame]:
    """`frame`'s rows in `parts` frames by the hash of `key` (every frame with frame's schema)."""
    if parts == 1:
        return [frame]
    tagged = frame.with_columns((_hash_key(pl.col(key), frame.schema[key]) % parts).alias("_part"))
    by = tagged.partition_by("_part", as_dict=True, include_key=False)
    return [by.get((j,), frame.clear()) for j in range(parts)]


def parts_for(rows: int, blocks: int) -> int:
    """How many parts a grouping's counts go to: about ROWS_PER_PART block answer rows (`rows`:
    the sum over blocks of each block's distinct values, an upper bound of the grouping's) per
    part, but no more than leave OBJECT_ROWS rows per block and part, nor PARTS_MAX."""
    return max(1, min(PARTS_MAX, math.ceil(rows / ROWS_PER_PART), rows // (max(blocks, 1) * OBJECT_ROWS)))


@dataclass
class Parts:
    """A grouped count table in parts: futures of `executor`, each a frame of the `key` column and
    the counts; a value of the key is in exactly one part (part_index says which)."""

    executor: Executor
    futures: list[Future]
    key: str


def _same(frame: pl.DataFrame) -> pl.DataFrame:
    return frame


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

    def partitioned(self, queries: dict[str, tuple[Query, str]], parts: int | None = None) -> dict[str, Parts]:
        """Grouped count queries (query, its key column), each answer one part on an in-process
        executor: the frame is here already (`parts` is for BlockSource; one part here)."""
        names = list(queries)
        frames = pl.collect_all([queries[k][0](self.frame) for k in names], engine="streaming")
        ex = LocalExecutor(cpus=1)
        return {k: Parts(ex, [ex.submit(_same, f, resources=TASK)], queries[k][1]) for k, f in zip(names, frames)}

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


def _distinct(frame: pl.DataFrame, keys: list[str]) -> list[list[int]]:
    """One block's number of distinct values per key column (a task: one answer, what sizes the parts);
    a key may be asked twice (a grouping and its net-of-policy view, curate/reports/policy_net.py)."""
    if not frame.height:
        return [[0] * len(keys)]
    n = frame.select(pl.col(k).n_unique() for k in dict.fromkeys(keys)).row(0, named=True)
    return [[n[k] for k in keys]]


def _split_answers(frame: pl.DataFrame, queries: list[Query], keys: list[str], parts: list[int]) -> list[pl.DataFrame]:
    """One block's answers to grouped count queries, each split by the hash of its key into its
    number of parts (a task: the map side of the shuffle; one return per query and part)."""
    lf = frame.lazy()
    out: list[pl.DataFrame] = []
    for answer, key, p in zip(pl.collect_all([q(lf) for q in queries]), keys, parts):
        out += split_by_hash(answer, key, p)
    return out


def _sum_part(key: str, *frames: pl.DataFrame) -> pl.DataFrame:
    """One part of a grouped count table: its share of every block's counts, summed per value (a
    task: the reduce side; a value's counts are all here)."""
    return SumBy((key,)).merge(list(frames))


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

    def partitioned(self, queries: dict[str, tuple[Query, str]], parts: int | None = None) -> dict[str, Parts]:
        """Grouped count queries (query, its key column) answered by every block, each answer split
        by the hash of its key into parts and part j of every block summed in one task: the counts
        of one value are complete in one part, and none of it comes here. Parts per query: `parts`,
        else parts_for(the sum over blocks of each block's distinct keys, blocks), measured in one
        light wave."""
        names = list(queries)
        keys = [queries[k][1] for k in names]
        if not names:
            return {}
        if parts is None:
            distinct = self._fold(_distinct, (keys,), [lambda xs: [sum(c) for c in zip(*xs)]])[0]
            counts = [parts_for(int(d), len(self.blocks)) for d in distinct]
        else:
            counts = [parts] * len(names)
        ex = self.executor
        qs = [queries[k][0] for k in names]
        maps = [
            ex.submit(_split_answers, b, qs, keys, counts, resources=TASK, num_returns=sum(counts)) for b in self.blocks
        ]
        out, at = {}, 0
        for name, key, p in zip(names, keys, counts):
            futures = [ex.submit(_sum_part, key, *[m[at + j] for m in maps], resources=TASK) for j in range(p)]
            out[name], at = Parts(ex, futures, key), at + p
        return out

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
