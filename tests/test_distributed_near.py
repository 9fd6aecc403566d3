"""Near-duplicate captions and images on the block engine (curate/distributed_near.py) against the
in-process engine: the same decision columns for every row whatever the blocks and partitions,
for verified and unverified caption pairs, k-means with one cluster and many, a k-means fitted on
a sample smaller than the pool, and the perceptual-hash rule. The pool is a real `curate run`
with caption band keys; the embeddings files are synthetic vectors with planted near copies."""

import hashlib

import numpy as np
import polars as pl
import pytest

from curate import annotations, schema
from curate import distributed_decide as dd
from curate.config import SelectionConfig, load_spec
from curate.executor import LocalExecutor
from curate.filters.decide import decide
from curate.presets import preset_path
from curate.runner import run

N = 300  # rows per shard, 4 shards
D = 24  # embedding width
WORDS = "a photo of the red dog blue cat on grass near old house green tree big small car at night".split()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("near")
    rng = np.random.default_rng(11)
    bases = [list(rng.choice(WORDS, size=9)) for _ in range(70)]
    for s in range(4):
        texts = []
        for _ in range(N):
            words = list(bases[int(rng.integers(len(bases)))])
            for _ in range(int(rng.integers(0, 3))):  # 0-2 words changed: near copies of a base
                words[int(rng.integers(len(words)))] = str(rng.choice(WORDS))
            texts.append(" ".join(words))
        pl.DataFrame(
            {
                "uid": [hashlib.md5(f"{s}-{i}".encode()).hexdigest() for i in range(N)],
                "url": [f"https://img{s}.example.com/{i}.jpg" for i in range(N)],
                "text": texts,
                "original_width": rng.integers(50, 1200, N),
                "original_height": rng.integers(50, 1200, N),
                "clip_l14_similarity_score": rng.normal(0.25, 0.06, N).astype(np.float32),
            }
        ).write_parquet(d / f"{s:08d}.parquet")
    out = d / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(d)], "output.dir": str(out), "annotate.caption_minhash": True}
    )
    assert run(spec, executor=LocalExecutor()).ok
    # embeddings: 90 base directions, each row a base plus noise (small: a near copy; some rows
    # large noise: distinct); perceptual hashes: the base's hash with a few bits flipped
    centres = rng.normal(size=(90, D)).astype(np.float32)
    base_hash = rng.integers(0, 2**63, 90, dtype=np.int64).astype(np.uint64)
    (out / "embeddings").mkdir(exist_ok=True)
    for shard in annotations.completed_shards(str(out)):
        rows = pl.read_parquet(out / "annotations" / f"{shard}.parquet").get_column("row").to_numpy()
        which = rng.integers(0, 90, rows.size)
        noise = np.where(rng.random(rows.size) < 0.7, 0.05, 1.5)[:, None]
        x = centres[which] + noise * rng.normal(size=(rows.size, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        flips = rng.integers(0, 64, (rows.size, 3)).astype(np.uint64)
        ph = base_hash[which].copy()
        for k in range(3):
            ph ^= np.where(rng.random(rows.size) < 0.5, np.uint64(1) << flips[:, k], np.uint64(0))
        emb = pl.DataFrame(
            {
                schema.ROW: rows.astype(np.int64),
                schema.IMAGE_EMBEDDING: pl.Series(x.tolist(), dtype=pl.List(pl.Float32)),
                schema.IMAGE_PHASH: pl.Series(ph, dtype=pl.UInt64),
            }
        )
        if rows.size > 10:  # a missing embedding: that row is never an image near-duplicate
            emb = emb.slice(1)
        emb.write_parquet(annotations.embeddings_path(str(out), shard))
    return str(out)


RULES = {
    "captions": {"dedup": {"caption_jaccard": 0.6}},
    "captions-low": {"clip": {"min_score": 0.2}, "dedup": {"caption_jaccard": 0.4, "survivor": "first"}},
    "images-one-cluster": {"dedup": {"image_cosine": 0.97, "image_cluster_size": 100000}},
    "images-kmeans": {"dedup": {"image_cosine": 0.97, "image_cluster_size": 40}},
    "images-sampled": {"dedup": {"image_cosine": 0.97, "image_cluster_size": 40, "image_kmeans_sample": 300}},
    "images-phash": {"dedup": {"image_cosine": 0.9, "image_cluster_size": 60, "image_phash_max_distance": 2}},
    "both": {
        "clip": {"top_fraction": 0.8},
        "dedup": {"caption_jaccard": 0.5, "image_cosine": 0.97, "image_cluster_size": 50, "caption_exact": True},
    },
}


def _local(run_dir, sel):
    emb = annotations.embeddings_for(run_dir, sel)
    frame, resolved = decide(annotations.scan(run_dir), sel, embeddings=emb)
    return frame.collect().sort("shard", "row"), resolved.clip_threshold


def _sel(name, partitions=0):
    rules = RULES[name]
    return SelectionConfig.model_validate({**rules, "dedup": {**rules["dedup"], "partitions": partitions}})


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("rows_per_block,partitions", [(10**9, 0), (300, 0), (300, 3), (700, 2)])
def test_the_same_near_duplicates_as_the_local_engine(run_dir, name, rows_per_block, partitions):
    sel = _sel(name, partitions)
    want, threshold = _local(run_dir, sel)
    shards = annotations.completed_shards(run_dir)
    got = dd.decide_on_ray(run_dir, shards, sel, threshold, LocalExecutor(), rows_per_block=rows_per_block)
    assert got.sort("shard", "row").equals(want)
    reasons = want["reason"].value_counts()
    near = {"duplicate_caption", "duplicate_image_near"} & set(reasons["reason"].drop_nulls())
    assert near, reasons  # the near step had work
    for r in near:  # and clusters of several rows, not only pairs
        sizes = want.filter(pl.col("reason") == r).group_by("duplicate_of").len()["len"]
        assert sizes.max() > 1


def test_both_engines_fit_kmeans_on_the_same_sample(run_dir, monkeypatch):
    """With image_kmeans_sample below the pool, the centroids are fitted on about that many rows,
    the same rows in the same order in both engines (wherever the blocks cut the pool)."""
    import curate.distributed_near as dn
    import curate.filters.image_dedup as idd

    fitted = []
    real = idd.kmeans_centroids

    def spy(x, *a):
        fitted.append(x.copy())
        return real(x, *a)

    monkeypatch.setattr(idd, "kmeans_centroids", spy)
    monkeypatch.setattr(dn, "kmeans_centroids", spy)
    sel = _sel("images-sampled")
    want, threshold = _local(run_dir, sel)
    shards = annotations.completed_shards(run_dir)
    dd.decide_on_ray(run_dir, shards, sel, threshold, LocalExecutor(), rows_per_block=300)
    local, ray = fitted
    pool = int(want.filter(pl.col("reason").is_null() | (pl.col("reason") == "duplicate_image_near")).height)
    assert 200 < local.shape[0] < 420 < pool  # about image_kmeans_sample = 300 rows of the pool
    assert np.array_equal(local, ray)


def test_near_dedup_on_ray(run_dir, ray_session):
    from curate.ray_adapter import RayExecutor

    sel = _sel("both", 3)
    want, threshold = _local(run_dir, sel)
    shards = annotations.completed_shards(run_dir)
    got = dd.decide_on_ray(run_dir, shards, sel, threshold, RayExecutor(), rows_per_block=300)
    assert got.sort("shard", "row").equals(want)


def test_phash_rule_without_hashes_is_a_clear_error_on_both_engines(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for p in (copy / "embeddings").glob("*.parquet"):
        pl.read_parquet(p).with_columns(pl.lit(None, pl.UInt64).alias(schema.IMAGE_PHASH)).write_parquet(p)
    sel = _sel("images-phash")
    with pytest.raises(ValueError, match="no image_phash"):
        _local(str(copy), sel)
    shards = annotations.completed_shards(str(copy))
    with pytest.raises(ValueError, match="no image_phash"):
        dd.decide_on_ray(str(copy), shards, sel, None, LocalExecutor(), rows_per_block=300)
