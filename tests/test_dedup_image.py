"""Near-duplicate images (dedup.image_cosine): SemDeDup-style k-means + in-cluster cosine over the
CLIP image embeddings the score stage stores (score.store_embeddings). Embeddings come from the
bundled curate-tiny model (ScoreConfig() default)."""

from __future__ import annotations

import hashlib
import io as io_
import itertools

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import annotations, io, schema
from curate.demo import synthetic as sy
from curate.config import PipelineSpec, ScoreConfig, SelectionConfig
from curate.filters.decide import decide
from curate.filters.rules import RULE_ORDER, Reason

THRESHOLD = 0.95
SIZE = 96


@pytest.fixture(scope="module")
def scorer():
    from curate.stages.score import ClipScorer

    s = ClipScorer(ScoreConfig())
    yield s
    s.close()


def _variants(img: Image.Image, rng: np.random.Generator) -> list[bytes]:
    """Re-encode at JPEG quality 35, downscale 96 -> 64 px, crop 3 px off each side (6% of width
    in all, random offset) -- the copies a web crawl sees."""
    dx, dy = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    return [
        sy.to_jpeg(img, 35),
        sy.to_jpeg(img.resize((64, 64), Image.BICUBIC), 85),
        sy.to_jpeg(img.crop((dx, dy, SIZE - 6 + dx, SIZE - 6 + dy)), 85),
    ]


@pytest.fixture(scope="module")
def corpus(scorer):
    """40 distinct originals (every colour x background, a random shape: each pair differs in colour
    or background) + 3 near-duplicate variants of each + 10 exact byte copies of originals."""
    rng = np.random.default_rng(7)
    jpgs, group, kind = [], [], []
    for g, (color, bg) in enumerate(itertools.product(sy.COLORS, sy.BACKGROUNDS)):
        img = sy.render(sy.Attrs(sy.SHAPES[int(rng.integers(len(sy.SHAPES)))], color, bg), rng, SIZE, SIZE)
        for k, b in enumerate([sy.to_jpeg(img, 90), *_variants(img, rng)]):
            jpgs.append(b)
            group.append(g)
            kind.append("original" if k == 0 else "variant")
    for i in np.flatnonzero(np.array(kind) == "original")[:10]:
        jpgs.append(jpgs[i])
        group.append(group[i])
        kind.append("exact")
    ann, embl = _annotate(scorer, jpgs, kind, rng)
    return ann, embl, np.array(group), np.array(kind)


def _annotate(scorer, jpgs, kind, rng):
    """Annotation rows and (shard, row, image_embedding, image_phash) for images, as a run with
    score.store_embeddings would store them, split over two shards."""
    scores, emb, phash = scorer.score_for_dedup(jpgs, ["a picture"] * len(jpgs))
    assert not np.isnan(scores).any()
    n = len(jpgs)
    ann = pl.DataFrame(
        {
            schema.SHARD: ["part-00000" if i % 2 else "part-00001" for i in range(n)],  # split across shards
            schema.ROW: np.arange(n, dtype=np.int64) // 2,
            schema.UID: [hashlib.md5(str(i).encode()).hexdigest() for i in range(n)],
            schema.URL: [f"https://x.test/{i}.jpg" for i in range(n)],
            schema.CAPTION: [f"caption number {i}" for i in range(n)],
            schema.FETCH_STATUS: ["ok"] * n,
            schema.WIDTH: [SIZE] * n,
            schema.HEIGHT: [SIZE] * n,
            schema.IMAGE_SHA256: [hashlib.sha256(b).hexdigest() for b in jpgs],
            # exact copies score lowest, variants random: survivors are often variants, so exact
            # duplicates of a removed original must be re-pointed at the final survivor
            schema.CLIP_SCORE: np.where(np.array(kind) == "exact", 0.05, rng.uniform(0.2, 0.4, n)).astype(np.float32),
        }
    )
    ann = pl.from_arrow(annotations.conform(ann.to_arrow()))
    embl = pl.DataFrame(
        {
            schema.SHARD: ann[schema.SHARD],
            schema.ROW: ann[schema.ROW],
            schema.IMAGE_EMBEDDING: list(emb),
            schema.IMAGE_PHASH: pl.Series(phash, dtype=pl.UInt64),
        }
    ).with_columns(
        pl.col(schema.IMAGE_EMBEDDING).cast(pl.List(pl.Float16))
        if hasattr(pl, "Float16")
        else pl.col(schema.IMAGE_EMBEDDING)
    )
    return ann, embl


def _decide(ann: pl.DataFrame, embl: pl.DataFrame, sel: SelectionConfig) -> pl.DataFrame:
    """decide(), rows back in corpus order (joins need not keep it)."""
    d = decide(ann.lazy(), sel, embeddings=embl.lazy())[0].collect()
    pos = pl.DataFrame({schema.UID: ann[schema.UID], "_pos": np.arange(ann.height)})
    return d.join(pos, on=schema.UID).sort("_pos").drop("_pos")


def _sel(engine: str = "local", **dedup) -> SelectionConfig:
    return SelectionConfig.model_validate(
        {"name": "t", "engine": engine, "dedup": {"image_cosine": THRESHOLD, **dedup}}
    )


def _pair_metrics(d: pl.DataFrame, group: np.ndarray) -> tuple[float, float]:
    """(recall, precision) over pairs: predicted clusters are the survivor each removed row names."""
    uid_pos = {u: i for i, u in enumerate(d[schema.UID].to_list())}
    pred = np.arange(d.height)
    for i, of in enumerate(d[schema.DUPLICATE_OF].to_list()):
        if of is not None:
            pred[i] = uid_pos[of]
    same_true = group[:, None] == group[None, :]
    same_pred = pred[:, None] == pred[None, :]
    iu = np.triu_indices(d.height, 1)
    t, p = same_true[iu], same_pred[iu]
    return float((t & p).sum() / t.sum()), float((t & p).sum() / max(p.sum(), 1))


@pytest.mark.parametrize("cluster_size", [1000, 16])  # 1000: one cluster (exact); 16: k = 12 k-means clusters
def test_near_duplicates_found_distinct_kept(corpus, cluster_size):
    ann, embl, group, kind = corpus
    d = _decide(ann, embl, _sel(image_cluster_size=cluster_size))
    recall, precision = _pair_metrics(d, group)
    # each group of original + 3 variants should keep one copy and remove 3 as duplicate_image_near
    removed_variants = (d[schema.REASON].to_numpy()[kind != "exact"] == "duplicate_image_near").sum() / (3 * 40)
    print(
        f"cluster_size={cluster_size}: pair recall {recall:.3f}, pair precision {precision:.3f}, "
        f"variants removed {removed_variants:.3f}, kept {int(d[schema.KEPT].sum())} of 40 groups"
    )
    assert recall >= 0.9
    assert precision >= 0.95
    assert removed_variants >= 0.9
    # exact byte copies are still removed by the exact rule (which runs first)
    assert set(d.filter(pl.Series(kind == "exact"))[schema.REASON].to_list()) == {"duplicate_image"}
    # every removed duplicate names a kept row (earlier exact-dedup chains re-pointed)
    kept = set(d.filter(pl.col(schema.KEPT))[schema.UID].to_list())
    of = d.filter(pl.col(schema.DUPLICATE_OF).is_not_null())[schema.DUPLICATE_OF].to_list()
    assert of and set(of) <= kept
    # some exact copy pointed at an original that lost near dedup, and was re-pointed
    assert (
        d.filter(pl.Series(kind == "exact"))[schema.DUPLICATE_OF]
        .is_in(d.filter(pl.Series(kind == "original") & pl.col(schema.KEPT))[schema.UID].to_list())
        .not_()
    ).any()


def test_survivor_is_best_scored_copy(corpus):
    ann, embl, group, kind = corpus
    d = _decide(ann, embl, _sel())
    kept = d.filter(pl.col(schema.KEPT)).with_columns(pl.Series("g", group[d[schema.KEPT].to_numpy()]))
    best = (
        pl.DataFrame({"g": group, schema.CLIP_SCORE: d[schema.CLIP_SCORE], schema.UID: d[schema.UID]})
        .sort(schema.CLIP_SCORE, descending=True)
        .group_by("g", maintain_order=True)
        .first()
    )
    assert 40 <= kept.height <= 44  # one per group, but for a copy the threshold misses
    assert set(best[schema.UID].to_list()) <= set(kept[schema.UID].to_list())  # highest clip_score survives


def test_off_by_default_and_errors_without_embeddings(corpus):
    ann, embl, _, _ = corpus
    assert SelectionConfig(name="t").dedup.image_cosine is None
    assert ScoreConfig().store_embeddings is False
    assert RULE_ORDER.index(Reason.DUPLICATE_IMAGE_NEAR) == RULE_ORDER.index(Reason.DUPLICATE_CAPTION) + 1
    off = decide(ann.lazy(), SelectionConfig(name="t"))[0].collect()
    assert "duplicate_image_near" not in off[schema.REASON].to_list()
    with pytest.raises(ValueError, match="store_embeddings"):
        decide(ann.lazy(), _sel())


def test_score_window_writes_embeddings_before_scores_and_finish_before_marker(tmp_path, scorer, monkeypatch):
    from curate import shard_jobs, store

    run_dir, shard = str(tmp_path), "part-00000"
    rng = np.random.default_rng(3)
    jpgs = [sy.to_jpeg(sy.render(sy.random_attrs(rng), rng)) for _ in range(5)]
    jpgs[2] = b"not an image"
    ann = pl.DataFrame(
        {
            schema.SHARD: [shard] * 5,
            schema.ROW: np.arange(5, dtype=np.int64),
            schema.UID: [f"{i:032x}" for i in range(5)],
            schema.CAPTION: ["a red circle"] * 5,
            schema.FETCH_STATUS: [shard_jobs.PENDING] * 5,
        }
    )
    rows = pa.array(range(5), pa.int64())
    # a shard in flight with one window, fetched: what prepare_shard and fetch_window leave
    io.write_parquet(shard_jobs.work_path(run_dir, shard), annotations.conform(ann.to_arrow()))
    io.write_parquet(
        store.window_path(run_dir, shard, 0, "fetched"),
        pa.table({schema.ROW: rows, schema.FETCH_STATUS: pa.array(["ok"] * 5)}),
    )
    io.write_parquet(
        store.window_path(run_dir, shard, 0, "images"),
        pa.table(
            {schema.ROW: rows, schema.CAPTION: ["a red circle"] * 5, schema.IMAGE_BYTES: pa.array(jpgs, pa.binary())}
        ),
    )
    spec = PipelineSpec(name="t", input={"paths": ["x.parquet"]}, score={"store_embeddings": True})
    order = []
    real_write_parquet, real_write_json = shard_jobs.io.write_parquet, shard_jobs.io.write_json

    def spy_parquet(path, table, **kw):
        order.append(path.rsplit("/", 1)[-1])
        return real_write_parquet(path, table, **kw)

    def spy_json(path, obj):
        order.append((path.rsplit("/", 1)[-1], io.exists(annotations.embeddings_path(run_dir, shard))))
        return real_write_json(path, obj)

    monkeypatch.setattr(shard_jobs.io, "write_parquet", spy_parquet)
    monkeypatch.setattr(shard_jobs.io, "write_json", spy_json)
    sj = shard_jobs.ShardScorer.__new__(shard_jobs.ShardScorer)
    sj.spec, sj.scorer = spec, scorer
    assert sj.score_window(run_dir, shard, 0) == {"window": 0, "scored": 4, "score_s": pytest.approx(0, abs=60)}
    assert order == ["w00000.embeddings.parquet", "w00000.scores.parquet"]  # the scores file says "scored": last
    again = sj.score_window(run_dir, shard, 0)  # a retried call: found scored, nothing written
    assert again["reused"] and again["scored"] == 4 and len(order) == 2
    counts = {"rows": 5, "rows_read": 5, "forgotten": 0, "fetch_attempted": 5, "fetch_ok": 0}
    res = shard_jobs.finish_windows(run_dir, shard, spec.model_dump_json(), 1, counts)
    assert res["scored_now"] == 4 and res["fetch_ok"] == 5 and res["windows"] == 1
    assert order[-1] == ("part-00000.done", True)  # embeddings existed when the marker was written
    assert not (tmp_path / "_work" / shard).exists()  # the shard's scratch went with it
    final = pl.read_parquet(annotations.shard_path(run_dir, shard)).sort(schema.ROW)
    assert final[schema.FETCH_STATUS].to_list() == ["ok", "ok", "decode_failed", "ok", "ok"]
    # the stored JPEGs as fetched, in row order; zstd only where it gains (not on JPEG bytes)
    stored = pq.ParquetFile(store.images_path(run_dir, shard))
    rg = stored.metadata.row_group(0)
    assert {rg.column(i).path_in_schema: rg.column(i).compression for i in range(rg.num_columns)} == {
        schema.ROW: "ZSTD",
        schema.IMAGE_BYTES: "UNCOMPRESSED",
    }
    assert stored.read().to_pydict() == {schema.ROW: list(range(5)), schema.IMAGE_BYTES: jpgs}
    t = io.read_parquet(annotations.embeddings_path(run_dir, shard))
    assert t.column(schema.ROW).to_pylist() == [0, 1, 3, 4]  # the undecodable row has none
    assert t.schema.field(schema.IMAGE_EMBEDDING).type == pa.list_(pa.float16())
    e = np.array(t.column(schema.IMAGE_EMBEDDING).to_pylist(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=2e-3)
    ref = scorer.score([jpgs[0]], ["a red circle"])
    assert abs(float(e[0] @ e[0]) - 1) < 2e-3 and not np.isnan(ref).any()
    lf = annotations.scan_embeddings(run_dir, [shard])
    assert lf is not None and lf.collect().height == 4
    assert annotations.scan_embeddings(run_dir, ["part-00009"]) is None
    # the perceptual hash of each stored row is imagehash's pHash of the decoded image
    from curate.stages.phash import phash64

    want = [phash64(Image.open(io_.BytesIO(jpgs[r])).convert("RGB")) for r in (0, 1, 3, 4)]
    assert t.column(schema.IMAGE_PHASH).to_pylist() == want


@pytest.fixture(scope="module")
def hard_corpus(scorer):
    """Distinct images curate-tiny cannot tell apart: for each colour x background, two different
    shapes and a second rendering of the first shape (another size and position), each original
    with the same 3 near-duplicate variants as above."""
    rng = np.random.default_rng(11)
    jpgs, group, kind = [], [], []
    g = 0
    for color, bg in itertools.product(sy.COLORS, sy.BACKGROUNDS):
        s1, s2 = rng.choice(len(sy.SHAPES), size=2, replace=False)
        for shape in (sy.SHAPES[int(s1)], sy.SHAPES[int(s2)], sy.SHAPES[int(s1)]):
            img = sy.render(sy.Attrs(shape, color, bg), rng, SIZE, SIZE)
            for k, b in enumerate([sy.to_jpeg(img, 90), *_variants(img, rng)]):
                jpgs.append(b)
                group.append(g)
                kind.append("original" if k == 0 else "variant")
            g += 1
    ann, embl = _annotate(scorer, jpgs, kind, rng)
    return ann, embl, np.array(group), np.array(kind)


def test_perceptual_hash_keeps_distinct_lookalikes_apart(hard_corpus):
    """Embeddings alone merge distinct images of one colour and background (the tiny model's
    limit, docs/DEDUP.md); requiring pHash distance <= 12 as well restores precision while the
    re-encodes, resizes and crops are still found (10-13 give the same precision here)."""
    ann, embl, group, kind = hard_corpus
    r0, p0 = _pair_metrics(_decide(ann, embl, _sel(image_cluster_size=100_000)), group)
    d = _decide(ann, embl, _sel(image_cluster_size=100_000, image_phash_max_distance=12))
    r1, p1 = _pair_metrics(d, group)
    # each group of 4 should keep one copy: 3 removals per group
    removed_variants = (d[schema.REASON].to_numpy() == "duplicate_image_near").sum() / (3 * (group.max() + 1))
    print(
        f"hard corpus ({ann.height} images, {group.max() + 1} distinct): embeddings only recall {r0:.3f} "
        f"precision {p0:.3f}; + pHash<=12 recall {r1:.3f} precision {p1:.3f}, variants removed {removed_variants:.3f}"
    )
    assert p0 < 0.8  # the problem is real on this corpus
    assert p1 >= 0.95 and r1 >= 0.9 and 0.9 <= removed_variants <= 1.0


def test_phash_rule_needs_stored_hashes(corpus):
    ann, embl, _, _ = corpus
    with pytest.raises(ValueError, match="image_phash"):
        _decide(
            ann, embl.with_columns(pl.lit(None, pl.UInt64).alias(schema.IMAGE_PHASH)), _sel(image_phash_max_distance=12)
        )
