"""Near-duplicate captions and images on the cluster (selection.engine = "ray"), with no pool in the
driver: the same losers as filters/caption_dedup.py and filters/image_dedup.py, computed by tasks
over the blocks of curate/distributed_decide.py. The driver holds futures and a few counts.

Captions (dedup.caption_jaccard):
  map       each block applies the previous round's losers and sends its eligible rows' band-key
            lists (caption_lsh) to P partitions by a hash of the first key: identical lists meet.
  reps      each partition collapses identical key lists onto their smallest identity (an edge
            member -> representative, unverified, as in-process) and sends the representatives'
            band keys to P partitions by key.
  pairs     each partition pairs the representatives of its buckets (caption_dedup.bucket_pairs:
            all pairs, a star above BUCKET_CAP); a key lives in one partition, so the union of
            the pairs is the in-process candidate set.
  verify    (dedup.caption_verify) each pair goes to its first row's block, which adds that
            caption, then to its second row's block, which computes the exact Jaccard
            (caption_dedup.exact_jaccard) and keeps the pairs at dedup.caption_jaccard or above.
Images (dedup.image_cosine):
  map       each block joins its eligible rows to their stored embeddings and counts them.
  fit       the rows drawn by image_dedup's stable sample (about dedup.image_kmeans_sample) go to
            one task, which fits the centroids (image_dedup.kmeans_centroids).
  assign    each block assigns its rows to the nearest centroid and sends them to P partitions by
            cluster; each partition compares the pairs inside its clusters (image_dedup
            .cluster_edges, rows in identity order as in-process) and applies the pHash rule.
Both then:
  components  of the edges, by curate/distributed_components.py (Large-Star / Small-Star rounds;
            the label of a component is its smallest identity).
  survivors the component label becomes the row's dedup key for one exact round of
            distributed_decide (map_round / reduce_round): each component's survivor by the shared
            rule, the losers sent back to their blocks.

Identities (`_g` = shard index << 32 | row) order rows as the in-process index does (shards sorted,
rows in order), so "smallest" picks the same representative and star centre in both engines.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from curate import annotations, schema
from curate.distributed_components import component_labels
from curate.block_shuffle import G, KEY, TASK, Plan, apply_losers, by_block, map_round, reduce_round
from curate.executor import Executor
from curate.filters.caption_dedup import bucket_pairs, exact_jaccard, exploded_keys, representatives
from curate.filters.image_dedup import (
    _normalise,
    assign,
    check_hashes,
    clusters_for,
    cluster_edges,
    kmeans_centroids,
    sample_cut,
    sample_hash,
)
from curate.filters.rules import Reason
from curate.filters.survivors import Survivor
from curate.stages.phash import hamming

EDGES = {"a": pl.UInt64, "b": pl.UInt64}
SEED = 29


def _by_hash(frame: pl.DataFrame, expr: pl.Expr, partitions: int) -> list[pl.DataFrame]:
    """`frame` cut into `partitions` parts by a hash of `expr`."""
    if partitions == 1:
        return [frame]
    part = frame.with_columns((expr.hash(seed=SEED) % partitions).alias("_p"))
    parts = {k[0]: f.drop("_p") for k, f in part.partition_by("_p", as_dict=True).items()}
    return [parts.get(j, frame.clear()) for j in range(partitions)]


# --- captions -------------------------------------------------------------------------------------


def caption_map(plan: Plan, b: int, state: pl.DataFrame, prev: str | None, partitions: int, *lost) -> list:
    """[state after the previous losers, P parts of (_g, caption_lsh): the block's eligible rows
    with band keys, by a hash of their first key]."""
    state = apply_losers(state, prev, lost)
    if schema.CAPTION_LSH not in state.columns:  # annotations made without annotate.caption_minhash
        pool = pl.DataFrame(schema={G: pl.UInt64, schema.CAPTION_LSH: pl.List(pl.UInt64)})
    else:
        pool = state.filter(pl.col("_eligible") & pl.col(schema.CAPTION_LSH).is_not_null()).select(
            G, schema.CAPTION_LSH
        )
    return [state, *_by_hash(pool, pl.col(schema.CAPTION_LSH).list.first(), partitions)]


def caption_reps(partitions: int, *parts: pl.DataFrame) -> list:
    """[edges member -> representative for repeated key lists, P parts of the representatives'
    (band key, representative) by key]."""
    pool = pl.concat(parts)
    rep_of, reps = representatives(pool, G)
    members = rep_of.filter(pl.col(G) != pl.col("_rep")).select(pl.col(G).alias("a"), pl.col("_rep").alias("b"))
    return [members, *_by_hash(exploded_keys(reps), pl.col("_k"), partitions)]


def caption_pairs(plan: Plan, split: bool, *keys: pl.DataFrame) -> list[pl.DataFrame]:
    """The candidate pairs (a, b) of one key partition: [all of them], or (split) one part per
    block of `a` for verification."""
    pairs = bucket_pairs(pl.concat(keys)).select(pl.col("a").cast(pl.UInt64), pl.col("b").cast(pl.UInt64))
    return by_block(pairs, plan, "a") if split else [pairs]


def verify_first(plan: Plan, state: pl.DataFrame, *pairs: pl.DataFrame) -> list[pl.DataFrame]:
    """The pairs whose first row is in this block, with its caption, one part per block of `b`."""
    p = pl.concat(pairs).unique()
    caps = state.select(pl.col(G).alias("a"), pl.col(schema.CAPTION).alias("_cap_a"))
    return by_block(p.join(caps, on="a", how="left"), plan, "b")


def verify_second(state: pl.DataFrame, ngram: int, threshold: float, *pairs: pl.DataFrame) -> pl.DataFrame:
    """The pairs whose second row is in this block at or above the Jaccard threshold, as edges."""
    p = pl.concat(pairs)
    if p.height == 0:
        return pl.DataFrame(schema=EDGES)
    captions = pl.concat(
        [
            p.select(pl.col("a").alias(G), pl.col("_cap_a").alias(schema.CAPTION)).unique(G),
            state.select(G, schema.CAPTION).join(p.select(pl.col("b").alias(G)), on=G, how="semi"),
        ]
    )
    j = exact_jaccard(p.select("a", "b"), captions, ngram, G)
    return j.filter(pl.col("jaccard") >= threshold - 1e-12).select("a", "b")


def caption_edges(ex: Executor, plan: Plan, states: list, prev: str | None, lost: list, ngram: int) -> tuple:
    """(states after the previous losers, futures of the edge frames)."""
    B, P = plan.blocks, _partitions(plan)
    d = plan.sel.dedup
    outs = [
        ex.submit(caption_map, plan, b, states[b], prev, P, *lost[b], resources=TASK, num_returns=1 + P)
        for b in range(B)
    ]
    states = [o[0] for o in outs]
    reps = [ex.submit(caption_reps, P, *[o[1 + j] for o in outs], resources=TASK, num_returns=1 + P) for j in range(P)]
    edges = [r[0] for r in reps]
    split = d.caption_verify
    n = B if split else 1
    pairs = [
        ex.submit(caption_pairs, plan, split, *[r[1 + j] for r in reps], resources=TASK, num_returns=n)
        for j in range(P)
    ]
    if not split:
        return states, edges + [p[0] for p in pairs]
    firsts = [
        ex.submit(verify_first, plan, states[b], *[p[b] for p in pairs], resources=TASK, num_returns=B)
        for b in range(B)
    ]
    verified = [
        ex.submit(verify_second, states[b], ngram, d.caption_jaccard, *[f[b] for f in firsts], resources=TASK)
        for b in range(B)
    ]
    return states, edges + verified


# --- images ---------------------------------------------------------------------------------------


def image_map(plan: Plan, b: int, state: pl.DataFrame, prev: str | None, *lost) -> list:
    """[state after the previous losers, the block's pool (rows, unit embeddings), its size
    (rows, rows with a perceptual hash, whether the block has embeddings at all)]."""
    state = apply_losers(state, prev, lost)
    survivor = Survivor.of(plan.sel.dedup)
    emb = annotations.scan_embeddings(plan.run_dir, plan.block_shards(b))
    rows = (
        state.filter(pl.col("_eligible"))
        .select(G, *survivor.columns)
        .with_columns(pl.col(schema.SHARD).cast(pl.String), pl.col(schema.ROW).cast(pl.Int64))
    )
    if emb is None:
        x = np.zeros((0, 1), np.float32)
        return [state, (rows.clear().with_columns(pl.lit(None, pl.UInt64).alias(schema.IMAGE_PHASH)), x), (0, 0, False)]
    emb = emb.with_columns(pl.col(schema.ROW).cast(pl.Int64))
    pool = (
        rows.lazy()
        .join(emb, on=[schema.SHARD, schema.ROW], how="inner")
        .filter(pl.col(schema.IMAGE_EMBEDDING).is_not_null())
        .sort(G)
        .collect()
    )
    e = pool.get_column(schema.IMAGE_EMBEDDING)
    d = int(e.list.len().max() or 1)
    x = np.asarray(e.explode().cast(pl.Float32).to_numpy(), dtype=np.float32).reshape(pool.height, d)
    finite = np.isfinite(x).all(axis=1)
    pool, x = pool.drop(schema.IMAGE_EMBEDDING).filter(pl.Series(finite)), _normalise(x[finite])
    hashed = pool.height - pool.get_column(schema.IMAGE_PHASH).null_count()
    return [state, (pool, x), (pool.height, hashed, True)]


def image_sample(pool: tuple, cut: int | None) -> np.ndarray:
    """The block's rows drawn for the k-means fit, in identity order."""
    rows, x = pool
    return x if cut is None else x[rows.select(sample_hash() < cut).to_series().to_numpy()]


def image_fit(k: int, iters: int, seed: int, *samples: np.ndarray) -> np.ndarray:
    return kmeans_centroids(np.concatenate(samples), k, iters, seed)


def image_assign(pool: tuple, cent: np.ndarray, partitions: int) -> list[tuple]:
    """P parts (identities, cluster labels, unit embeddings, perceptual hashes) by cluster."""
    rows, x = pool
    labels = assign(x, cent) if rows.height else np.zeros(0, np.int64)
    g = rows.get_column(G).to_numpy()
    ph = rows.get_column(schema.IMAGE_PHASH)
    has, hv = ph.is_not_null().to_numpy(), ph.fill_null(0).cast(pl.UInt64).to_numpy()
    which = labels % partitions
    out = []
    for j in range(partitions):
        m = which == j
        out.append((g[m], labels[m], x[m], has[m], hv[m]))
    return out


def image_compare(threshold: float, phash_max: int | None, *parts: tuple) -> pl.DataFrame:
    """The edges inside this partition's clusters (cosine >= threshold, and the pHash rule)."""
    g = np.concatenate([p[0] for p in parts])
    if g.size < 2:
        return pl.DataFrame(schema=EDGES)
    order = np.argsort(g, kind="stable")  # identity order within each cluster, as in-process
    g = g[order]
    labels, x, has, hv = (np.concatenate([p[i] for p in parts])[order] for i in range(1, 5))
    a, b = cluster_edges(x, labels, threshold)
    if phash_max is not None and a.size:
        keep = has[a] & has[b] & (hamming(hv[a], hv[b]) <= phash_max)
        a, b = a[keep], b[keep]
    return pl.DataFrame({"a": g[a], "b": g[b]}, schema=EDGES)


def image_edges(ex: Executor, plan: Plan, states: list, prev: str | None, lost: list) -> tuple:
    """(states after the previous losers, futures of the edge frames)."""
    B, P = plan.blocks, _partitions(plan)
    d = plan.sel.dedup
    outs = [ex.submit(image_map, plan, b, states[b], prev, *lost[b], resources=TASK, num_returns=3) for b in range(B)]
    states, pools = [o[0] for o in outs], [o[1] for o in outs]
    sizes = ex.results([o[2] for o in outs])
    if not any(s[2] for s in sizes):
        raise annotations.no_embeddings(plan.run_dir)
    n = sum(s[0] for s in sizes)
    check_hashes(d.image_phash_max_distance, n, sum(s[1] for s in sizes))
    if n < 2:
        return states, []
    cut = sample_cut(n, d.image_kmeans_sample)
    samples = [ex.submit(image_sample, pools[b], cut, resources=TASK) for b in range(B)]
    k = clusters_for(n, d.image_cluster_size)
    cent = ex.submit(image_fit, k, d.image_kmeans_iters, d.image_kmeans_seed, *samples, resources=TASK)
    assigned = [ex.submit(image_assign, pools[b], cent, P, resources=TASK, num_returns=P) for b in range(B)]
    edges = [
        ex.submit(image_compare, d.image_cosine, d.image_phash_max_distance, *[a[j] for a in assigned], resources=TASK)
        for j in range(P)
    ]
    return states, edges


# --- components -> survivors ------------------------------------------------------------------------


def labels_by_block(plan: Plan, labels: pl.DataFrame) -> list[pl.DataFrame]:
    return by_block(labels, plan, "node")


def label_map(plan: Plan, b: int, state: pl.DataFrame, reason: str, partitions: int, *labels: pl.DataFrame) -> list:
    """map_round with the rows' component labels as the dedup key of `reason`."""
    key = f"{KEY}{reason}"
    lab = pl.concat(labels).select(pl.col("node").alias(G), pl.col("label").alias(key))
    state = state.drop(key, strict=False).join(lab, on=G, how="left", maintain_order="left")
    return map_round(plan, b, state, None, reason, partitions)


def near_round(
    ex: Executor, plan: Plan, reason: Reason, states: list, prev: str | None, lost: list, ngram: int | None
) -> tuple[list, list]:
    """One near-dedup step: (states, losers per block), as an exact round returns them."""
    B, P = plan.blocks, _partitions(plan)
    if reason == Reason.DUPLICATE_CAPTION:
        states, edges = caption_edges(ex, plan, states, prev, lost, ngram)
    else:
        states, edges = image_edges(ex, plan, states, prev, lost)
    labels, _rounds = component_labels(ex, edges, P, resources=TASK)
    by_block = [ex.submit(labels_by_block, plan, lab, resources=TASK, num_returns=B) for lab in labels]
    outs = [
        ex.submit(
            label_map, plan, b, states[b], reason.value, P, *[x[b] for x in by_block], resources=TASK, num_returns=1 + P
        )
        for b in range(B)
    ]
    states = [o[0] for o in outs]
    reduced = [
        ex.submit(reduce_round, plan, *[o[1 + j] for o in outs], resources=TASK, num_returns=B) for j in range(P)
    ]
    return states, [[r[b] for r in reduced] for b in range(B)]


def _partitions(plan: Plan) -> int:
    return plan.partitions
