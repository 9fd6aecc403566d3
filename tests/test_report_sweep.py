"""The threshold sweep equals decide() at every threshold (exactly, per group), and flips
between two thresholds are exactly the rows whose fate changes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.annotations import conform
from curate.config import SelectionConfig
from curate.filters.decide import decide
from curate.reports.sweep import flips, representatives, sweep, thresholds


def synthetic_annotations(n: int = 4000, seed: int = 3) -> pl.LazyFrame:
    rng = np.random.default_rng(seed)
    langs = np.array(["en", "de", "pl", "fr", None], dtype=object)
    status = np.array(["ok"] * 8 + ["download_failed", "not_attempted"], dtype=object)
    score = rng.normal(0.3, 0.08, n).round(3)  # rounded: many ties, to exercise the tie-breaks
    recs = pl.DataFrame(
        {
            "shard": [f"s{i % 4}" for i in range(n)],
            "row": np.arange(n) // 4,
            "uid": [f"{int(x):032x}" for x in rng.integers(0, 10**12, n)],
            "caption": [f"cap {i}" for i in range(n)],
            "url": [f"http://u/raw/{i}" for i in range(n)],  # every row has a URL (else: missing_url)
            "language": langs[rng.integers(0, 5, n)],
            "caption_words": rng.integers(1, 8, n).astype(np.int32),
            "caption_chars": rng.integers(3, 60, n).astype(np.int32),
            "domain": [f"d{x}.com" for x in rng.integers(0, 12, n)],
            "url_normalized": [None if x < 5 else f"http://u/{x}" for x in rng.integers(0, n // 2, n)],
            "image_sha256": [None if x < 20 else f"h{x}" for x in rng.integers(0, n // 2, n)],
            "fetch_status": status[rng.integers(0, 10, n)],
            "original_width": rng.integers(10, 400, n).astype(np.int32),
            "original_height": rng.integers(10, 400, n).astype(np.int32),
            # nulls, not NaN: decide() currently treats a NaN score as passing (see docs/REPORTS.md)
            "clip_score": pl.Series(np.where(rng.random(n) < 0.03, np.nan, score).astype(np.float32), nan_to_null=True),
        }
    )
    recs = recs.with_columns(
        pl.when(pl.col("fetch_status") != "ok").then(None).otherwise(pl.col("clip_score")).alias("clip_score")
    )
    return pl.from_arrow(conform(recs.to_arrow())).lazy()


SEL = dict(language={"allow": ["en", "de", "pl"]}, caption={"min_words": 2}, image={"min_side": 40})


@pytest.mark.parametrize("dedup", [(True, True), (True, False), (False, True), (False, False)])
def test_sweep_equals_decide_at_every_threshold(dedup):
    ann = synthetic_annotations()
    sel = SelectionConfig(**SEL, dedup={"url": dedup[0], "image_sha256": dedup[1]})
    thr = thresholds(0.15, 0.45, 0.05) + [0.3, 0.301]
    res = sweep(ann, sel, thr, group_columns=["language", "domain"], top_groups=20)
    assert res["thresholds"] == sorted(thr)
    for i, t in enumerate(res["thresholds"]):
        d, _ = decide(
            ann, SelectionConfig(**SEL, dedup={"url": dedup[0], "image_sha256": dedup[1]}, clip={"min_score": t})
        )
        d = d.collect()
        assert res["overall"]["kept"][i] == int(d["kept"].sum()), t
        for c in ("language", "domain"):
            exp = d.group_by(c).agg(pl.col("kept").sum(), pl.len())
            exp = {("(unknown)" if r[c] is None else r[c]): (r["kept"], r["len"]) for r in exp.iter_rows(named=True)}
            for g in res["groups"][c]:
                assert (g["kept"][i], g["rows_in"]) == exp[g["value"]], (c, g["value"], t)
    assert len(res["groups"]["domain"]) == 12 and len(res["groups"]["language"]) == 5


def test_flips_are_the_rows_whose_fate_changes():
    ann = synthetic_annotations()
    sel = SelectionConfig(**SEL)
    a, b = 0.25, 0.33
    da = decide(ann, SelectionConfig(**SEL, clip={"min_score": a}))[0].collect().select("uid", "shard", "row", "kept")
    db = (
        decide(ann, SelectionConfig(**SEL, clip={"min_score": b}))[0]
        .collect()
        .select("shard", "row", "kept", "reason", "language")
    )
    j = da.join(db, on=["shard", "row"], suffix="_b")
    changed = j.filter(pl.col("kept") != pl.col("kept_b"))
    assert changed.filter(pl.col("kept_b")).height == 0  # stricter never keeps more
    assert set(changed["reason"].unique()) == {"clip_score"}
    reps = representatives(ann, sel)
    sizes = {"language": ann.group_by("language").agg(pl.len().alias("rows_in")).collect()}
    f = flips(reps, a, b, group_columns=["language"], sizes=sizes, sample=10_000)
    assert f["rows"] == changed.height
    assert {(r["shard"], r["row"]) for r in f["sample"]} == set(zip(changed["shard"], changed["row"]))
    per = dict(changed.group_by("language").len().iter_rows())
    assert {g["value"]: g["flips"] for g in f["groups"]["language"]} == {
        ("(unknown)" if k is None else k): v for k, v in per.items()
    }


def test_thresholds_inclusive_and_exact():
    assert thresholds(0.15, 0.40, 0.01)[-1] == 0.4 and len(thresholds(0.15, 0.40, 0.01)) == 26
    assert thresholds(0.15, 0.40, 0.01)[15] == 0.3
    with pytest.raises(ValueError):
        thresholds(0.4, 0.1, 0.01)


def test_flips_groups_that_tie_come_in_one_order():
    """Groups with the same retention change and flips are listed by value, whatever order the
    rows (or the Ray engine's block answers) came in: both engines write the same report."""
    from curate.reports.sweep import SCORE

    reps = pl.DataFrame(
        {
            SCORE: [0.25] * 6,
            "uid": [f"{i:032x}" for i in range(6)],
            "shard": "s",
            "row": list(range(6)),
            "language": ["uz", "my", "de", "uz", "my", "de"],
        }
    )
    sizes = {"language": pl.DataFrame({"language": ["uz", "my", "de"], "rows_in": [10, 10, 10]})}
    orders = set()
    for frame in (reps, reps.reverse(), reps.sample(fraction=1.0, shuffle=True, seed=1)):
        got = flips(frame.lazy(), 0.2, 0.3, group_columns=["language"], sizes=sizes, score_dtype=pl.Float64)
        orders.add(tuple(g["value"] for g in got["groups"]["language"]))
    assert orders == {("de", "my", "uz")}


def _bridged(scores: list[float]) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Rows on a chain of unit vectors, neighbours at cosine 0.97 and rows two apart at 0.88: with
    image_cosine 0.95 the chain is one component only through every row of it."""
    from curate import schema

    n = len(scores)
    step = np.arccos(0.97)
    emb = [[float(np.cos(i * step)), float(np.sin(i * step)), 0.0] for i in range(n)]
    rows = pl.DataFrame(
        {
            "shard": ["s0"] * n,
            "row": np.arange(n, dtype=np.int64),
            "uid": [f"{i:032x}" for i in range(n)],
            "caption": [f"a caption {i}" for i in range(n)],
            "caption_words": np.full(n, 3, dtype=np.int32),
            "caption_chars": np.full(n, 12, dtype=np.int32),
            "url": [f"http://u/raw/{i}" for i in range(n)],
            "url_normalized": [f"http://u/{i}" for i in range(n)],
            "image_sha256": [f"h{i}" for i in range(n)],
            "fetch_status": ["ok"] * n,
            "width": [96] * n,
            "height": [96] * n,
            "original_width": [96] * n,
            "original_height": [96] * n,
            "clip_score": np.array(scores, dtype=np.float32),
        }
    )
    ann = pl.from_arrow(conform(rows.to_arrow())).lazy()
    embeddings = pl.DataFrame(
        {schema.SHARD: ["s0"] * n, schema.ROW: np.arange(n, dtype=np.int64), schema.IMAGE_EMBEDDING: emb}
    ).with_columns(pl.col(schema.IMAGE_EMBEDDING).cast(pl.List(pl.Float32)))
    return ann, embeddings.lazy()


def test_with_a_near_dedup_the_sweep_is_a_lower_bound_and_says_so():
    """A ~ B ~ C with A and C apart, B scored lowest: at -inf one cluster and A survives; at 0.6 a real
    selection drops B, and A and C are each kept. The sweep counts the representatives (A): fewer,
    never more, and its answer says why (docs/REPORTS.md)."""
    ann, emb = _bridged([0.9, 0.5, 0.8])
    near = dict(caption={"min_words": 1}, image={"min_side": 1}, dedup={"image_cosine": 0.95})
    thr = [0.4, 0.6, 0.85]
    res = sweep(ann, SelectionConfig(**near), thr, embeddings=emb)
    kept = []
    for t in thr:
        d, _ = decide(ann, SelectionConfig(**near, clip={"min_score": t}), embeddings=emb)
        kept.append(int(d.collect()["kept"].sum()))
    assert kept == [1, 2, 1]  # 0.6: the bridge is gone, both ends kept
    assert res["overall"]["kept"] == [1, 1, 1]
    assert all(s <= k for s, k in zip(res["overall"]["kept"], kept))
    assert "lower bound" in res["near_dedup"] and "lower bound" in res["method"]

    # random chains: still never more than a real selection keeps
    rng = np.random.default_rng(5)
    ann, emb = _bridged(list(rng.uniform(0.2, 0.9, 40).round(3)))
    thr = thresholds(0.2, 0.9, 0.05)
    res = sweep(ann, SelectionConfig(**near), thr, embeddings=emb)
    for i, t in enumerate(res["thresholds"]):
        d, _ = decide(ann, SelectionConfig(**near, clip={"min_score": t}), embeddings=emb)
        assert res["overall"]["kept"][i] <= int(d.collect()["kept"].sum()), t

    exact = sweep(synthetic_annotations(400), SelectionConfig(**SEL), [0.3])
    assert exact["near_dedup"] is None and exact["method"].startswith("exact")
