"""Near-duplicate captions, globally: the selection-time half of caption dedup.

Input: the rows that pass every other rule and have a `caption_lsh` annotation (b uint64 LSH band
keys per row, computed per shard by curate.stages.caption_minhash). Output: for every row that is
a near-duplicate of a better copy, the survivor's uid and row index.

  1. Rows with identical key lists (all b bands equal: the same MinHash signature, in practice the
     same shingle set) collapse into one representative; they are merged without a check.
  2. Candidate pairs: representatives sharing any band key (explode + self-join on the key). A
     bucket with more than BUCKET_CAP representatives contributes a star (every member paired with
     the bucket's first) instead of all pairs, so a degenerate key cannot make the step quadratic.
  3. Verification (dedup.caption_verify): each candidate pair's exact Jaccard on the same
     shingles the signatures were built from, by a join of the two rows' shingle-hash sets; pairs
     below dedup.caption_jaccard are dropped. Without it every candidate pair is an edge.
  4. Connected components of the edges (scipy.sparse.csgraph); in each component the survivor is
     chosen by dedup.survivor (filters/survivors.py: by default the highest clip_score, then the
     smallest uid, then the smallest (shard, row) -- the same rule as exact dedup) and every other
     member is a `duplicate_caption` pointing at it.

Everything here is polars joins/group-bys and numpy on the candidate rows only. The Ray engine
(curate/distributed_near.py) runs each step as tasks on the same functions: representatives and
bucket_pairs per hash partition, exact_jaccard in the blocks holding the two captions, components by
Large-Star / Small-Star rounds (curate/distributed_components.py).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from curate import schema
from curate.filters.survivors import BEST_SCORE, Survivor, as_duplicates, components, duplicates_frame, losers
from curate.stages.caption_minhash import shingle_hashes

BUCKET_CAP = 64


def representatives(pool: pl.DataFrame, idx: str = "_i") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rep_of: idx -> _rep, the smallest idx with the same key list; reps: (_rep, caption_lsh)
    for each representative)."""
    lsh = schema.CAPTION_LSH
    reps = pool.select(idx, lsh).with_columns(pl.col(idx).min().over(lsh).alias("_rep"))
    return reps.select(idx, "_rep"), reps.filter(pl.col(idx) == pl.col("_rep")).select("_rep", lsh)


def exploded_keys(reps: pl.DataFrame) -> pl.DataFrame:
    """(_k, _rep): one record per band key of each representative."""
    return reps.select(pl.col(schema.CAPTION_LSH).alias("_k"), "_rep").explode("_k")


def bucket_pairs(keys: pl.DataFrame) -> pl.DataFrame:
    """Candidate pairs (a, b), a < b, from (_k, _rep) records that hold EVERY record of each key
    they mention (all of them, or one hash partition of the keys): all pairs within a bucket of
    up to BUCKET_CAP representatives, a star on the bucket's smallest member above that."""
    sizes = keys.group_by("_k").agg(pl.len().alias("_n")).filter(pl.col("_n") > 1)
    keys = keys.join(sizes, on="_k", how="inner")
    small = keys.filter(pl.col("_n") <= BUCKET_CAP).select("_k", "_rep")
    pairs_small = (
        small.join(small, on="_k", suffix="_b")
        .filter(pl.col("_rep") < pl.col("_rep_b"))
        .select(pl.col("_rep").alias("a"), pl.col("_rep_b").alias("b"))
    )
    big = keys.filter(pl.col("_n") > BUCKET_CAP).select("_k", "_rep")
    pairs_big = (
        big.with_columns(pl.col("_rep").min().over("_k").alias("a"))
        .filter(pl.col("_rep") != pl.col("a"))
        .select("a", pl.col("_rep").alias("b"))
    )
    return pl.concat([pairs_small, pairs_big]).unique()


def local_pairs(reps: pl.DataFrame) -> pl.DataFrame:
    """The in-process pair finder: every key in one polars group-by."""
    return bucket_pairs(exploded_keys(reps))


def candidate_pairs(pool: pl.DataFrame, idx: str = "_i") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rep_of: idx -> rep, pairs: (a, b) of representatives sharing a band key, a < b). The Ray
    engine (curate/distributed_near.py) runs the same two steps as shuffles: representatives per
    partition of the key lists, bucket_pairs per partition of the keys."""
    rep_of, reps = representatives(pool, idx)
    pairs = local_pairs(reps).sort("a", "b")
    return rep_of, pairs


def exact_jaccard(pairs: pl.DataFrame, captions: pl.DataFrame, ngram: int, idx: str = "_i") -> pl.DataFrame:
    """pairs (a, b) + column `jaccard`: exact Jaccard of the two captions' shingle-hash sets."""
    if pairs.height == 0:
        return pairs.with_columns(pl.lit(None, pl.Float64).alias("jaccard"))
    ids = pl.concat([pairs.get_column("a"), pairs.get_column("b")]).unique()
    caps = captions.join(ids.to_frame(idx), on=idx, how="semi")
    rows, hv = shingle_hashes(caps.get_column(schema.CAPTION).fill_null(""), ngram)
    sh = pl.DataFrame({idx: caps.get_column(idx).to_numpy()[rows], "h": hv}).unique()
    size = sh.group_by(idx).agg(pl.len().alias("n"))
    inter = (
        pairs.join(sh.rename({idx: "a"}), on="a")
        .join(sh.rename({idx: "b"}), on=["b", "h"], how="semi")
        .group_by("a", "b")
        .agg(pl.len().alias("i"))
    )
    return (
        pairs.join(inter, on=["a", "b"], how="left")
        .join(size.rename({idx: "a", "n": "na"}), on="a", how="left")
        .join(size.rename({idx: "b", "n": "nb"}), on="b", how="left")
        .with_columns(pl.col("i").fill_null(0))
        .with_columns((pl.col("i") / (pl.col("na") + pl.col("nb") - pl.col("i"))).fill_null(0.0).alias("jaccard"))
        .select("a", "b", "jaccard")
    )


def caption_duplicates(
    pool: pl.DataFrame,
    threshold: float,
    ngram: int,
    verify: bool = True,
    idx: str = "_i",
    survivor: Survivor = BEST_SCORE,
) -> pl.DataFrame:
    """pool: eligible rows with idx, caption_lsh (non-null), caption and survivor.columns
    (clip_score, uid, shard, row for the default rule). Returns (idx, of_uid, of_idx, cluster) for
    every row removed as a caption near-duplicate; `cluster` is the survivor's idx."""
    empty = duplicates_frame(idx)
    if pool.height < 2:
        return empty
    rep_of, pairs = candidate_pairs(pool, idx)
    if verify:
        pairs = exact_jaccard(pairs, pool.select(idx, schema.CAPTION), ngram, idx)
        pairs = pairs.filter(pl.col("jaccard") >= threshold - 1e-12).select("a", "b")
    edges = pl.concat(
        [
            rep_of.filter(pl.col(idx) != pl.col("_rep")).select(pl.col(idx).alias("a"), pl.col("_rep").alias("b")),
            pairs.cast(pl.UInt32),
        ]
    )
    if edges.height == 0:
        return empty
    # local node ids over the rows that have an edge
    nodes = pl.concat([edges.get_column("a"), edges.get_column("b")]).unique().sort()
    a = np.searchsorted(nodes.to_numpy(), edges.get_column("a").to_numpy())
    b = np.searchsorted(nodes.to_numpy(), edges.get_column("b").to_numpy())
    comp = pl.DataFrame({idx: nodes, "_c": components(a, b, nodes.len())})
    return as_duplicates(losers(pool.join(comp, on=idx), "_c", idx, survivor), idx)
