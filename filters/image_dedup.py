"""Near-duplicate images, globally: SemDeDup-style clustering of the stored CLIP image embeddings.

Input: the rows that pass every other rule (exact dedup and caption near-dedup included) and have
an embedding in embeddings/<shard>.parquet (written by the score stage with
score.store_embeddings). Output: for every row that is a near-duplicate of a better copy, the
survivor's uid and row index.

  1. Spherical k-means (numpy, seeded: k = ceil(n / dedup.image_cluster_size), initial centroids
     a seeded sample of rows, dedup.image_kmeans_iters Lloyd rounds on cosine) puts similar
     images in one cluster, so the pairwise step below is quadratic in a cluster, not in n. The
     centroids are fitted on about dedup.image_kmeans_sample rows (drawn by a stable hash of shard
     and row: the same rows in both engines; every row when the pool is that small) and every row
     is then assigned to its nearest centroid, as SemDeDup does at LAION scale: on Ray the fit is
     one task and the assignment runs in each block's task (curate/distributed_near.py).
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

import numpy as np
import polars as pl

from curate import schema
from curate.filters.survivors import BEST_SCORE, Survivor, as_duplicates, components, duplicates_frame, losers
from curate.stages.phash import hamming

_BLOCK = 4096
_ASSIGN_ROWS = 65536
SAMPLE_SEED = 20261130


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def kmeans_centroids(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means on unit rows x [n, d] (float32), deterministic for a seed: the centroids
    [k', d] whose assignment (`assign`) is the last Lloyd round's labels (the centroids are not
    moved after the last assignment, so assign(x, kmeans_centroids(x, ...)) == kmeans(x, ...))."""
    n = x.shape[0]
    if k <= 1 or n == 0:
        return _normalise(x.sum(axis=0, keepdims=True)) if n else np.zeros((1, x.shape[1]), np.float32)
    if n <= k:
        return x.copy()  # every row its own cluster
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    labels = np.full(n, -1, dtype=np.int64)
    for it in range(iters):
        new = assign(x, cent)
        if np.array_equal(new, labels) or it == iters - 1:
            break
        labels = new
        sums = np.zeros_like(cent)
        np.add.at(sums, labels, x)
        filled = np.linalg.norm(sums, axis=1) > 0
        cent[filled] = _normalise(sums[filled])  # an empty cluster keeps its old centroid
    return cent


def assign(x: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """The nearest centroid (largest cosine) of each unit row of x: k-means' assignment step, run
    on every row of the pool (in the driver, or by each block's task on Ray)."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    if cent.shape[0] == 1:
        labels[:] = 0
        return labels
    for s in range(0, x.shape[0], _ASSIGN_ROWS):
        labels[s : s + _ASSIGN_ROWS] = np.argmax(x[s : s + _ASSIGN_ROWS] @ cent.T, axis=1)
    return labels


def kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means labels for unit rows x [n, d] (float32); deterministic for a seed."""
    return assign(x, kmeans_centroids(x, k, iters, seed))


def clusters_for(n: int, cluster_size: int) -> int:
    """k for a pool of n rows: ceil(n / dedup.image_cluster_size)."""
    return max(1, math.ceil(n / cluster_size))


def check_hashes(max_distance: int | None, rows: int, hashed: int) -> None:
    """dedup.image_phash_max_distance needs the perceptual hashes stored with the embeddings:
    rows in the pool, none of them hashed, is a clear error (both engines)."""
    if max_distance is not None and rows and not hashed:
        raise ValueError(
            "dedup.image_phash_max_distance is set but the stored embeddings have no image_phash "
            "(a run made before perceptual hashes were stored): rerun scoring, or set it to null"
        )


def sample_cut(n: int, sample_rows: int) -> int | None:
    """The k-means sample: rows whose SAMPLE_HASH is below this cut (about sample_rows of n);
    None when the whole pool is the sample (n <= sample_rows). The same rule in both engines, so
    the fit sees the same rows wherever they lie."""
    if n <= sample_rows:
        return None
    return int((1 << 64) * sample_rows // n)


def sample_hash() -> pl.Expr:
    """A row's stable draw for the k-means sample: a hash of its (shard, row)."""
    return pl.concat_str(
        pl.col(schema.SHARD).cast(pl.String), pl.col(schema.ROW).cast(pl.String), separator="\x1f"
    ).hash(seed=SAMPLE_SEED)


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


def image_duplicates(
    pool: pl.DataFrame,
    threshold: float,
    cluster_size: int = 1000,
    iters: int = 20,
    seed: int = 0,
    sample_rows: int = 1_000_000,
    idx: str = "_i",
    phash_max_distance: int | None = None,
    survivor: Survivor = BEST_SCORE,
) -> pl.DataFrame:
    """pool: eligible rows with idx, image_embedding (non-null) and survivor.columns (clip_score,
    uid, shard, row for the default rule).
    Returns (idx, of_uid, of_idx, cluster) for every row removed as an image near-duplicate;
    `cluster` is the survivor's idx. The Ray engine runs the same steps as tasks
    (curate/distributed_near.py).
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
    cut = sample_cut(x.shape[0], sample_rows)
    fit = x if cut is None else x[pool.select(sample_hash() < cut).to_series().to_numpy()]
    labels = assign(x, kmeans_centroids(fit, clusters_for(x.shape[0], cluster_size), iters, seed))
    a, b = cluster_edges(x, labels, threshold)
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
