"""Which copy of a duplicate group survives, for every kind of dedup (exact URL, exact image,
near-duplicate caption, near-duplicate image): the highest clip_score (rows without a score rank
last), then the smallest uid, then the smallest (shard, row). One rule, so that every dedup
agrees and changing the CLIP threshold re-picks survivors the same way everywhere."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import polars as pl

from curate import schema

SURVIVOR_ORDER = [schema.CLIP_SCORE, schema.UID, schema.SHARD, schema.ROW]
SURVIVOR_DESC = [True, False, False, False]

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def losers(frame: Frame, group: str, idx: str) -> Frame:
    """Rows of `frame` (idx, group, SURVIVOR_ORDER columns) that are not their group's survivor,
    as (idx, of_uid, of_idx): the survivor's uid and row index."""
    return (
        frame.select(idx, group, *SURVIVOR_ORDER)
        .sort(SURVIVOR_ORDER, descending=SURVIVOR_DESC, nulls_last=True)
        .with_columns(
            pl.col(schema.UID).first().over(group).alias("of_uid"),
            pl.col(idx).first().over(group).alias("of_idx"),
        )
        .filter(pl.col(idx) != pl.col("of_idx"))
        .select(idx, "of_uid", "of_idx")
    )


def components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label of each of n nodes, given undirected edges a[k] -- b[k]."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, label = connected_components(coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n)), directed=False)
    return label


def duplicates_frame(idx: str) -> pl.DataFrame:
    """The (empty) result schema of a near-duplicate step: idx, of_uid, of_idx, cluster."""
    return pl.DataFrame(schema={idx: pl.UInt32, "of_uid": pl.String, "of_idx": pl.UInt32, "cluster": pl.UInt32})


def as_duplicates(lost: pl.DataFrame, idx: str) -> pl.DataFrame:
    """losers() output in the near-duplicate result schema; `cluster` is the survivor's idx."""
    return lost.select(
        pl.col(idx).cast(pl.UInt32), "of_uid", pl.col("of_idx").cast(pl.UInt32), pl.col("of_idx").cast(pl.UInt32).alias("cluster")
    )
