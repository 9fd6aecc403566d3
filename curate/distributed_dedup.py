"""The global dedup steps on Ray (selection.engine = "ray"): the same results as the
in-process engine, with the all-rows work spread over the cluster. They are written against the
executor interface (curate/executor.py): a RayExecutor unless one is given (a LocalExecutor runs
the same shuffle in-process: tests).

* Captions: candidate pairs are a group-by on LSH band keys. Here it is a hash shuffle: map tasks
  take a block of representatives, explode their band keys and split the (key, rep) records
  into P partitions by key (`num_returns=P`: P futures, so reducer j only ever fetches partition
  j of every map output); reduce task j runs `bucket_pairs` on partition j. A key lives in exactly one
  partition, so each reducer sees whole buckets and the union of their pairs is exactly the
  in-process result. Verification and connected components run on the (few) candidate pairs.
* Images: after k-means, the in-cluster pairwise comparisons (the quadratic part) run in Ray
  tasks, clusters assigned to P tasks by label; the edges come back as row indices.

Only the candidate / edge steps move; the survivor rule (dedup.survivor: best_score, first or
priority) and the join back are shared with the in-process engine (filters/caption_dedup.py,
filters/image_dedup.py, filters/survivors.py), so both engines keep the same copies.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from curate.default_executor import given_or_ray
from curate.executor import Executor, Resources
from curate.filters.caption_dedup import bucket_pairs, exploded_keys
from curate.filters.image_dedup import cluster_edges

ROWS_PER_BLOCK = 250_000  # representatives per map task
TASK = Resources(cpus=1)  # each map, reduce or edge task


def _partition_keys(reps: pl.DataFrame, partitions: int) -> list[pl.DataFrame]:
    keys = exploded_keys(reps).with_columns((pl.col("_k") % partitions).alias("_p"))
    parts = {p[0]: f.drop("_p") for p, f in keys.partition_by("_p", as_dict=True).items()}
    empty = keys.drop("_p").clear()
    return [parts.get(j, empty) for j in range(partitions)]


def _reduce_pairs(*parts: pl.DataFrame) -> pl.DataFrame:
    return bucket_pairs(pl.concat(parts))


def ray_caption_pairs(partitions: int = 0, rows_per_block: int = ROWS_PER_BLOCK, executor: Executor | None = None):
    """A caption pair finder (filters.caption_dedup.PairFinder) that shuffles on Ray (or `executor`)."""

    def find(reps: pl.DataFrame) -> pl.DataFrame:
        ex = given_or_ray(executor)
        blocks = max(1, math.ceil(reps.height / rows_per_block))
        p = partitions or max(2, blocks)
        step = math.ceil(reps.height / blocks) if reps.height else 1
        outs = [
            ex.submit(_partition_keys, reps.slice(i, step), p, resources=TASK, num_returns=p)
            for i in range(0, max(reps.height, 1), step)
        ]
        pairs = ex.results([ex.submit(_reduce_pairs, *[o[j] for o in outs], resources=TASK) for j in range(p)])
        return pl.concat(pairs).unique()

    return find


def _edges_for(
    x: np.ndarray, labels: np.ndarray, members: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    a, b = cluster_edges(x, labels, threshold)
    return members[a], members[b]


def ray_image_edges(partitions: int = 0, executor: Executor | None = None):
    """An image edge finder (filters.image_dedup.EdgeFinder): k-means clusters compared in Ray
    tasks (or on `executor`)."""

    def find(x: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        ex = given_or_ray(executor)
        n_clusters = int(labels.max()) + 1 if labels.size else 0
        p = partitions or max(2, min(n_clusters, 64))
        futures = []
        for j in range(p):
            members = np.flatnonzero(labels % p == j)
            if members.size > 1:
                futures.append(ex.submit(_edges_for, x[members], labels[members], members, threshold, resources=TASK))
        got = ex.results(futures)
        if not got:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])

    return find
