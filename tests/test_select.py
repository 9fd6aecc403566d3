"""Selection semantics on hand-built annotation tables: rule order, all reasons, not_scored,
DataComp-exact top fraction, and deterministic dedup survivors."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate.annotations import conform
from curate.config import SelectionConfig
from curate.filters.decide import decide


def ann(rows: list[dict]) -> pl.LazyFrame:
    base = {
        "shard": "s",
        "uid": None,
        "url": "http://x/1",
        "caption": "a b c d",
        "language": "en",
        "language_score": 0.9,
        "caption_chars": 20,
        "caption_words": 4,
        "domain": "x",
        "tld": None,
        "url_normalized": None,
        "fetch_status": "ok",
        "original_width": 100,
        "original_height": 100,
        "image_sha256": None,
        "clip_score": 0.5,
    }
    recs = []
    for i, r in enumerate(rows):
        rec = {**base, "row": i, "uid": f"{i:032x}", "url_normalized": f"http://x/{i}", **r}
        recs.append(rec)
    return pl.from_arrow(conform(pa.Table.from_pylist(recs))).lazy()


def run(rows, **sel):
    d, resolved = decide(ann(rows), SelectionConfig(**sel))
    return d.collect().sort("row"), resolved


def test_first_reason_follows_rule_order_and_reasons_lists_all():
    d, _ = run(
        [
            {"language": "fr", "caption_words": 1, "clip_score": 0.1},  # fails language, caption, clip
            {"clip_score": 0.1},  # clip only
            {},  # kept
        ],
        language={"allow": ["en"]},
        caption={"min_words": 3},
        clip={"min_score": 0.3},
    )
    assert d["kept"].to_list() == [False, False, True]
    assert d["reason"].to_list() == ["language", "clip_score", None]
    assert d["reasons"].to_list()[0] == ["language", "caption_length", "clip_score"]
    assert d["reasons"].to_list()[2] == []


def test_fetch_failures_and_unscored_rows_get_their_own_reasons():
    d, _ = run(
        [
            {"fetch_status": "download_failed", "clip_score": None},
            {"fetch_status": "not_attempted", "clip_score": None, "original_width": None, "original_height": None},
            {"fetch_status": "ok", "clip_score": 0.2},
        ],
        clip={"min_score": 0.3},
        image={"min_side": 50},
    )
    assert d["reason"].to_list() == ["fetch_failed", "not_scored", "clip_score"]
    # a failed fetch is never also reported as "not scored": the fetch is the cause
    assert d["reasons"].to_list()[0] == ["fetch_failed"]


def test_image_size_uses_served_dimensions():
    d, _ = run(
        [{"original_width": 40, "original_height": 300}, {"original_width": 300, "original_height": 1000}, {}],
        image={"min_side": 50, "max_aspect": 3.0},
    )
    assert d["reason"].to_list() == ["image_size", "image_size", None]


def test_top_fraction_is_exactly_datacomps_rule():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.05, 1000).astype(np.float32)
    scores[10] = scores[11]  # a tie
    d, resolved = run(
        [{"clip_score": float(s)} for s in scores],
        clip={"top_fraction": 0.3},
        dedup={"url": False, "image_sha256": False},
    )
    # datacomp baselines.get_threshold: n = int(len * fraction); threshold = -np.sort(-scores)[n]; keep >= threshold
    s64 = d["clip_score"].cast(pl.Float64).to_numpy()
    threshold = -np.sort(-s64)[int(len(s64) * 0.3)]
    assert resolved.clip_threshold == pytest.approx(threshold)
    assert d["kept"].to_numpy().tolist() == (s64 >= threshold).tolist()
    assert d["kept"].sum() == int(1000 * 0.3) + 1


def test_duplicate_survivor_is_the_best_scored_eligible_copy():
    same = "http://x/same.jpg"
    d, _ = run(
        [
            {"url_normalized": same, "clip_score": 0.40},
            {"url_normalized": same, "clip_score": 0.90, "language": "fr"},  # best score but fails language
            {"url_normalized": same, "clip_score": 0.60},  # survivor
            {"url_normalized": same, "clip_score": 0.60, "uid": "f" * 32},  # tie on score: larger uid loses
        ],
        language={"allow": ["en"]},
    )
    assert d["kept"].to_list() == [False, False, True, False]
    assert d["reason"].to_list() == ["duplicate_url", "language", None, "duplicate_url"]
    survivor = d["uid"][2]
    assert d["duplicate_of"].to_list() == [survivor, None, None, survivor]


def test_changing_the_threshold_repicks_the_survivor():
    same = "http://x/same.jpg"
    rows = [
        {"url_normalized": same, "clip_score": 0.35, "language": "en"},
        {"url_normalized": same, "clip_score": 0.50, "language": "de"},
    ]
    d1, _ = run(rows, language={"allow": ["en"]})
    d2, _ = run(rows)
    assert d1["kept"].to_list() == [True, False]
    assert d2["kept"].to_list() == [False, True]


def test_image_duplicates_and_every_duplicate_points_at_a_kept_row():
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(300):
        rows.append(
            {
                "url_normalized": f"http://x/{rng.integers(0, 150)}",
                "image_sha256": f"{rng.integers(0, 200):064x}",
                "clip_score": float(rng.random()),
            }
        )
    d, _ = run(rows, clip={"min_score": 0.2})
    kept_uids = set(d.filter(pl.col("kept"))["uid"].to_list())
    dups = d.filter(pl.col("reason").is_in(["duplicate_url", "duplicate_image"]))
    assert dups.height > 0
    assert set(dups["duplicate_of"].to_list()) <= kept_uids
    # kept rows are unique on both keys
    k = d.filter(pl.col("kept"))
    assert k["url_normalized"].n_unique() == k.height and k["image_sha256"].n_unique() == k.height
    assert d.height == 300 and (d["kept"] | d["reason"].is_not_null()).all()


def test_nan_scores_are_not_scored_never_kept():
    d, _ = run([{"clip_score": float("nan")}, {"clip_score": 0.9}], clip={"min_score": 0.3})
    assert d["reason"].to_list() == ["not_scored", None]


def test_url_caption_pair_key_keeps_one_row_per_caption_of_a_url():
    import pyarrow as pa

    from curate.annotations import conform

    t = conform(
        pa.table(
            {
                "shard": ["s"] * 4,
                "row": [0, 1, 2, 3],
                "uid": [f"{i:032x}" for i in range(4)],
                "url": [
                    "http://a.test/x.jpg",
                    "HTTP://a.test/x.jpg#frag",
                    "http://a.test/x.jpg",
                    "http://b.test/y.jpg",
                ],
                "url_normalized": ["http://a.test/x.jpg"] * 3 + ["http://b.test/y.jpg"],
                "caption": ["a red car", "a red car", "a blue car", "a red car"],
                "fetch_status": ["not_needed"] * 4,
                "clip_score": pa.array([0.3, 0.4, 0.2, 0.3], pa.float32()),
            }
        )
    )
    lf = pl.from_arrow(t).lazy()
    by_url = decide(lf, SelectionConfig(dedup={"image_sha256": False}))[0].collect().sort("row")
    assert by_url["reason"].to_list() == ["duplicate_url", None, "duplicate_url", None]
    pair = decide(lf, SelectionConfig(dedup={"image_sha256": False, "url_key": "url_caption"}))[0].collect().sort("row")
    assert pair["reason"].to_list() == ["duplicate_url", None, None, None]
    assert pair["duplicate_of"][0] == pair["uid"][1] and "_url_caption" not in pair.columns


def test_auto_engine_goes_to_ray_for_big_pools_and_inside_ray_jobs(monkeypatch):
    from curate.filters import decide as decide_mod

    frame = ann([{}] * 5)
    auto, local = SelectionConfig(engine="auto"), SelectionConfig()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not decide_mod.on_ray(auto, frame) and not decide_mod.on_ray(local, frame)
    assert decide_mod.on_ray(SelectionConfig(engine="ray"), frame)
    monkeypatch.setattr(decide_mod, "AUTO_RAY_ROWS", 4)  # more rows than one machine should hold
    assert decide_mod.on_ray(auto, frame) and not decide_mod.on_ray(local, frame)
    monkeypatch.setattr(decide_mod, "AUTO_RAY_ROWS", 5)
    assert not decide_mod.on_ray(auto, frame)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a job on a cluster
    assert decide_mod.on_ray(auto, frame) and not decide_mod.on_ray(local, frame)


def test_uids_npy_is_datacomps_sorted_pairs_of_the_distinct_uids():
    from curate.selection import uids_to_datacomp

    rng = np.random.default_rng(5)
    uids = [f"{int(a):016x}{int(b):016x}" for a, b in zip(rng.integers(0, 2**63, 500), rng.integers(0, 2**63, 500))]
    uids += ["f" * 32, "0" * 32, uids[3], uids[3].upper(), "FFFFFFFFFFFFFFFF0000000000000001"]
    want = np.array(sorted({(int(u[:16], 16), int(u[16:], 16)) for u in uids}), dtype=np.dtype("u8,u8"))
    got = uids_to_datacomp(uids)
    assert got.dtype == np.dtype("u8,u8") and got.tobytes() == want.tobytes()
    assert uids_to_datacomp(pl.Series(uids)).tobytes() == want.tobytes()
    assert len(uids_to_datacomp([])) == 0
    for bad in ("abc", "g" * 32, "0x" + "0" * 30, "0" * 33):
        with pytest.raises(ValueError, match="not 32 hex digits"):
            uids_to_datacomp(["0" * 32, bad])
