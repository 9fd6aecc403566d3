"""Near-duplicate images, globally: SemDeDup-style clustering of the stored CLIP image embeddings.

Input: the rows that pass every other rule (exact dedup and caption near-dedup included) and have
an embedding in embeddings/<shard>.parquet (written by the score stage with
score.store_embeddings). Output: for every row that is a near-duplicate of a better copy, the
survivor's uid and row index.

  1. Spherical k-means (numpy, seeded: k = ceil(n / dedup.image_cluster_size), initial centroids
     a seeded sample of rows, dedup.image_kmeans_iters Lloyd rounds on cosine) puts similar
     images in one cluster, so the pairwise step below is quadratic in a cluster, not in n.
  2. Within each cluster every pair with cosine >= dedup.image_cosine is an edge (blocked matrix
     products, float32 on the float16 embeddings re-normalised).
  3. Connected components of the edges; the survivor of a component is chosen by dedup.survivor
     (filters/survivors.py: by default the highest clip_score, then the smallest uid, then the
     smallest (shard, row) -- the rule of exact and caption dedup) and every other member is a
     `duplicate_image_near` pointing at it.

Pairs split across two k-means clusters are not compared (SemDeDup's approximation): raising
image_cluster_size trades time for recall; with n <= image_cluster_size the comparison is exact.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import polars as pl

from curate import schema
from curate.filters.survivors import BEST_SCORE, Survivor, as_duplicates, components, duplicates_frame, losers
from curate.stages.phash import hamming

_BLOCK = 4096


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means labels for unit rows x [n, d] (float32); deterministic for a seed."""
    n = x.shape[0]
    if k <= 1 or n <= k:
        return np.zeros(n, dtype=np.int64) if k <= 1 else np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iters):
        new = np.empty(n, dtype=np.int64)
        for s in range(0, n, 65536):
            new[s : s + 65536] = np.argmax(x[s : s + 65536] @ cent.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(cent)
        np.add.at(sums, labels, x)
        filled = np.linalg.norm(sums, axis=1) > 0
        cent[filled] = _normalise(sums[filled])  # an empty cluster keeps its old centroid
    return labels


def cluster_edges(x: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) row pairs, a < b, in one cluster with cosine >= threshold."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    aa, bb = [], []
    for members in np.split(order, bounds):
        if members.size < 2:
            continue
        xm = x[members]
        for s in range(0, members.size, _BLOCK):
            sim = xm[s : s + _BLOCK] @ xm.T  # [block, m]
            i, j = np.nonzero(sim >= threshold - 1e-6)
            i = i + s
            keep = i < j
            aa.append(members[i[keep]])
            bb.append(members[j[keep]])
    if not aa:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(aa), np.concatenate(bb)


EdgeFinder = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def image_duplicates(
    pool: pl.DataFrame,
    threshold: float,
    cluster_size: int = 1000,
    iters: int = 20,
    seed: int = 0,
    idx: str = "_i",
    edge_finder: EdgeFinder = cluster_edges,
    phash_max_distance: int | None = None,
    survivor: Survivor = BEST_SCORE,
) -> pl.DataFrame:
    """pool: eligible rows with idx, image_embedding (non-null) and survivor.columns (clip_score,
    uid, shard, row for the default rule).
    Returns (idx, of_uid, of_idx, cluster) for every row removed as an image near-duplicate;
    `cluster` is the survivor's idx. edge_finder: cluster_edges here, or curate.distributed_dedup's
    version that compares each k-means cluster in a Ray task (the same edges).
    phash_max_distance: an edge also needs the two images' perceptual hashes (column image_phash)
    within this Hamming distance; a row without a hash then has no edge."""
    empty = duplicates_frame(idx)
    if pool.height < 2:
        return empty
    emb = pool.get_column(schema.IMAGE_EMBEDDING)
    d = emb.list.len().max()
    x = np.asarray(emb.explode().cast(pl.Float32).to_numpy(), dtype=np.float32).reshape(pool.height, d)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():  # a stored NaN row (should not happen): never a duplicate of anything
        pool, x = pool.filter(pl.Series(finite)), x[finite]
    x = _normalise(x)
    k = max(1, math.ceil(x.shape[0] / cluster_size))
    labels = kmeans(x, k, iters, seed)
    a, b = edge_finder(x, labels, threshold)
    if phash_max_distance is not None and a.size:
        ph = pool.get_column(schema.IMAGE_PHASH)
        has = ph.is_not_null().to_numpy()
        hv = ph.fill_null(0).cast(pl.UInt64).to_numpy()
        keep = has[a] & has[b] & (hamming(hv[a], hv[b]) <= phash_max_distance)
        a, b = a[keep], b[keep]
    if a.size == 0:
        return empty
    n = x.shape[0]
    comp = components(a, b, n)
    in_edge = np.zeros(n, dtype=bool)
    in_edge[a] = True
    in_edge[b] = True
    grouped = pool.with_columns(pl.Series("_c", comp)).filter(pl.Series(in_edge))
    return as_duplicates(losers(grouped, "_c", idx, survivor), idx)
