"""Which copy of a duplicate group survives, for every kind of dedup (exact URL, exact image,
near-duplicate caption, near-duplicate image; the in-process and the Ray engine alike): one rule,
`selection.dedup.survivor`, so every dedup agrees.

  best_score (default)  the highest clip_score (rows without a score rank last), then the smallest
                        uid, then the smallest (shard, row). Changing the CLIP threshold re-picks
                        survivors the same way everywhere.
  first                 keep-first: the smallest (shard, row), i.e. input order (shard names sort as
                        input files part-00000, part-00001, ... do), as Data-Juicer and DataTrove
                        keep a group's first occurrence.
  priority              the highest value of `dedup.survivor_column` (an annotation column, numeric,
                        boolean or temporal; input columns get there through input.keep_columns;
                        null and NaN rank last), ties broken as best_score.

Whatever the rule, dedup runs among rows that pass every other rule, so the survivor is the best
(or first) *eligible* copy, and `duplicate_of` always names a kept row (filters/decide.py re-points
earlier duplicates when their survivor loses a later dedup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import polars as pl

from curate import schema

SURVIVOR_ORDER = [schema.CLIP_SCORE, schema.UID, schema.SHARD, schema.ROW]  # best_score's order
SURVIVOR_DESC = [True, False, False, False]

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


@dataclass(frozen=True)
class Survivor:
    """A survivor rule: "best_score", "first" or "priority" (with `column`), as a DedupRule asks
    for (curate.config checks the combination: the one place it is checked)."""

    rule: str = "best_score"
    column: str | None = None

    @classmethod
    def of(cls, dedup) -> "Survivor":
        """The rule a DedupRule (curate.config) asks for."""
        return cls(dedup.survivor, dedup.survivor_column)

    @property
    def order(self) -> tuple[list[str], list[bool]]:
        """(sort columns, descending flags): the group's first row after this sort survives."""
        if self.rule == "first":
            return [schema.SHARD, schema.ROW], [False, False]
        if self.rule == "priority":
            rest = [(c, d) for c, d in zip(SURVIVOR_ORDER, SURVIVOR_DESC) if c != self.column]
            return [self.column, *(c for c, _ in rest)], [True, *(d for _, d in rest)]
        return list(SURVIVOR_ORDER), list(SURVIVOR_DESC)

    @property
    def columns(self) -> list[str]:
        """The columns a dedup pool must carry for this rule (the uid names the survivor)."""
        return list(dict.fromkeys([*self.order[0], schema.UID]))

    def check(self, columns: pl.Schema | dict) -> None:
        """Raise a ValueError naming the column when the annotations cannot rank by this rule."""
        if self.rule != "priority":
            return
        if self.column not in columns:
            raise ValueError(
                f"dedup.survivor_column {self.column!r} is not a column of the annotations (input columns reach "
                f"them only through input.keep_columns); annotation columns: {', '.join(sorted(columns))}"
            )
        dtype = columns[self.column]
        if not (dtype.is_numeric() or dtype.is_temporal() or dtype == pl.Boolean):
            raise ValueError(
                f"dedup.survivor_column {self.column!r} has type {dtype}: the highest value wins, so it must be "
                "numeric, boolean, a date or a time (cast a text priority to a number in the input)"
            )


BEST_SCORE = Survivor()


def losers(frame: Frame, group: str, idx: str, survivor: Survivor = BEST_SCORE) -> Frame:
    """Rows of `frame` (idx, group, survivor.columns) that are not their group's survivor, as
    (idx, of_uid, of_idx): the survivor's uid and row index. NaN ranks with null: last."""
    by, desc = survivor.order
    have = frame.collect_schema()
    nan_free = [pl.col(c).fill_nan(None) for c in by if have[c].is_float()]
    return (
        frame.select(idx, group, *survivor.columns)
        .with_columns(nan_free)
        .sort(by, descending=desc, nulls_last=True)
        .with_columns(
            pl.col(schema.UID).first().over(group).alias("of_uid"),
            pl.col(idx).first().over(group).alias("of_idx"),
        )
        .filter(pl.col(idx) != pl.col("of_idx"))
        .select(idx, "of_uid", "of_idx")
    )


def repeated_losers(pool: Frame, group: str, idx: str, survivor: Survivor = BEST_SCORE) -> Frame:
    """losers() among the rows whose `group` value repeats: a hash count first, so the sort ranks
    the (usually few) duplicated rows rather than the whole pool. One step for the in-process
    dedup (filters/decide.py) and each partition of the Ray shuffle (curate/distributed_decide.py)."""
    repeated = pool.group_by(group).agg(pl.len().alias("_n")).filter(pl.col("_n") > 1).select(group)
    return losers(pool.join(repeated, on=group, how="semi"), group, idx, survivor)


def components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label of each of n nodes, given undirected edges a[k] -- b[k]."""
    # lazy: scipy.sparse.csgraph adds ~0.2-0.28 s to `curate select`; only near-dedup (off by default) needs it
    from scipy.sparse import coo_matrix, csgraph

    _, label = csgraph.connected_components(
        coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n)), directed=False
    )
    return label


def duplicates_frame(idx: str) -> pl.DataFrame:
    """The (empty) result schema of a near-duplicate step: idx, of_uid, of_idx, cluster."""
    return pl.DataFrame(schema={idx: pl.UInt32, "of_uid": pl.String, "of_idx": pl.UInt32, "cluster": pl.UInt32})


def as_duplicates(lost: pl.DataFrame, idx: str) -> pl.DataFrame:
    """losers() output in the near-duplicate result schema; `cluster` is the survivor's idx."""
    return lost.select(
        pl.col(idx).cast(pl.UInt32),
        "of_uid",
        pl.col("of_idx").cast(pl.UInt32),
        pl.col("of_idx").cast(pl.UInt32).alias("cluster"),
    )
