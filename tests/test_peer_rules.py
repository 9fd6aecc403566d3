"""What a peer suite (Data-Juicer, DataTrove cases) could not express (issue case 17):

(a) which copy of a duplicate group survives: dedup.survivor = best_score | first | priority, for
    every dedup kind (exact URL, exact sha256, caption near-dup, image near-dup; local and Ray
    engines), checked against a brute-force reference written here;
(b) CJK-aware caption_words (each Han / kana character is a word), on real captions;
(c) caption near-dup without verification is refused unless the LSH bands are precise enough.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import defaultdict

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import regex

from curate import schema
from curate.annotations import conform
from curate.config import PipelineSpec, SelectionConfig, SpecError, parse_spec
from curate.filters.decide import decide
from curate.stages import caption_minhash as cm
from curate.stages.annotate import annotate_text, caption_word_counts

MINIMAL = {"name": "t", "input": {"paths": ["x.parquet"]}}
RULES = [("best_score", None), ("first", None), ("priority", "pri"), ("priority", "pri_f")]
OUT = ["uid", "kept", "reason", "duplicate_of", "duplicate_cluster"]


# --------------------------------------------------------------------------------------------------
# (a) survivors: a reference implementation, independent of filters/survivors.py


def ref_key(rule: str, column: str | None, r: dict) -> tuple:
    """The rule's order as a Python sort key: the smallest key survives."""

    def present(v):
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    clip = r["clip_score"]
    best = (0, -clip) if present(clip) else (1, 0.0)
    best = (*best, r["uid"], r["shard"], r["row"])
    if rule == "best_score":
        return best
    if rule == "first":  # input order, as Data-Juicer / DataTrove keep the first occurrence
        return (r["shard"], r["row"])
    v = r[column]
    return ((0, -float(v)) if present(v) else (1, 0.0)) + best


def reference(rows: list[dict], group_of, eligible, rule: str, column: str | None) -> dict:
    """uid -> (kept, duplicate_of, duplicate_cluster) for one dedup kind: groups are group_of(row)
    over eligible rows; the survivor of each group is the row with the smallest ref_key."""
    groups = defaultdict(list)
    for r in rows:
        if eligible(r) and group_of(r) is not None:
            groups[group_of(r)].append(r)
    out = {r["uid"]: (eligible(r), None, None) for r in rows}
    for members in groups.values():
        if len(members) < 2:
            continue
        win = min(members, key=lambda r: ref_key(rule, column, r))
        for r in members:
            out[r["uid"]] = (r is win, None if r is win else win["uid"], win["uid"])
    return out


def got(d: pl.DataFrame) -> dict:
    return {u: (k, o, c) for u, k, o, c in d.select("uid", "kept", "duplicate_of", "duplicate_cluster").iter_rows()}


def laion_families(laion_sample, n: int) -> list[str]:
    """n real LAION captions (ASCII, >= 6 words) no two of which have word-bigram Jaccard >= 0.5,
    so a caption near-duplicate group is exactly the variants built from one of them."""
    caps = pl.read_parquet(laion_sample, columns=["TEXT"]).get_column("TEXT").drop_nulls().to_list()

    def bigrams(c):
        w = re.findall(r"\w+", unicodedata.normalize("NFKC", c).lower())
        return set(zip(w, w[1:]))

    chosen, sets = [], []
    for c in caps:
        if not c.isascii() or len(c.split()) < 6 or "_" in c:
            continue
        s = bigrams(c)
        if len(s) >= 5 and all(len(s & t) / len(s | t) < 0.5 for t in sets):
            chosen.append(c)
            sets.append(s)
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough distinct LAION captions")


@pytest.fixture(scope="module")
def corpus(laion_sample):
    """900 rows over 3 shards, stored in shuffled order (input order != storage order != uid
    order): URL and sha256 collisions, caption families (a LAION caption and its case/punctuation
    variants), image families (unit embedding + small noise), score ties, null and NaN scores,
    an integer and a float priority column with ties, nulls and NaN, and non-English rows that are
    never eligible."""
    rng = np.random.default_rng(17)
    n, d = 900, 32
    fams = laion_families(laion_sample, 120)
    base_emb = rng.normal(size=(150, d))
    rows, emb = [], []
    for i in range(n):
        shard, row = f"part-{i % 3:05d}", i // 3
        fam = int(rng.integers(0, 120))
        variant = [str.upper, lambda c: c + "!!", lambda c: c.replace(" ", "  "), lambda c: c][int(rng.integers(4))]
        score = round(float(rng.uniform(0.1, 0.4)), 2)  # rounded: many ties
        pri = int(rng.integers(0, 4))
        pri_f = float(rng.uniform(0, 1))
        rows.append(
            {
                "shard": shard,
                "row": row,
                "uid": f"{int(rng.integers(0, 2**62)):032x}",
                "url": f"http://x/{i}",
                "url_normalized": f"http://x/{int(rng.integers(0, 300))}",
                "image_sha256": f"{int(rng.integers(0, 350)):064x}",
                "caption": variant(fams[fam]),
                "_cap_family": fam,
                "language": "en" if rng.random() > 0.1 else "fr",
                "fetch_status": "ok",
                "clip_score": None if rng.random() < 0.05 else (float("nan") if rng.random() < 0.03 else score),
                "pri": None if rng.random() < 0.1 else pri,
                "pri_f": None if rng.random() < 0.05 else (float("nan") if rng.random() < 0.05 else pri_f),
            }
        )
        fam_img = int(rng.integers(0, 150))
        rows[-1]["_img_family"] = fam_img
        e = base_emb[fam_img] / np.linalg.norm(base_emb[fam_img]) + rng.normal(scale=0.01, size=d)
        emb.append(e / np.linalg.norm(e))
    order = rng.permutation(n)
    rows = [rows[i] for i in order]
    emb = np.asarray(emb)[order]
    t = pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    t = t.append_column("caption_lsh", cm.caption_lsh(pl.Series([r["caption"] for r in rows]), 0.8))
    ann = pl.from_arrow(conform(t, keep_columns=["pri", "pri_f"]))
    embeddings = pl.DataFrame(
        {
            schema.SHARD: ann[schema.SHARD],
            schema.ROW: ann[schema.ROW],
            schema.IMAGE_EMBEDDING: pl.Series(emb.tolist(), dtype=pl.List(pl.Float32)),
        }
    )
    # the reference reads the values back as stored (float32 scores)
    stored = ann.select("shard", "row", "uid", "clip_score", "pri", "pri_f").to_dicts()
    for r, s in zip(rows, stored):
        assert (r["uid"], r["shard"], r["row"]) == (s["uid"], s["shard"], s["row"])
        r.update(clip_score=s["clip_score"], pri=s["pri"], pri_f=s["pri_f"])
    # the data is as designed: distinct image families are far apart, copies close
    cos = emb @ emb.T
    fam = np.array([r["_img_family"] for r in rows])
    same = fam[:, None] == fam[None, :]
    assert cos[same].min() > 0.99 and cos[~same].max() < 0.9
    return rows, ann, embeddings


def _eligible(r):
    return r["language"] == "en"


KINDS = {
    # kind -> (dedup settings with only this kind on, reference group of a row)
    "url": ({"url": True, "image_sha256": False}, lambda r: r["url_normalized"]),
    "sha256": ({"url": False, "image_sha256": True}, lambda r: r["image_sha256"]),
    "caption": ({"url": False, "image_sha256": False, "caption_jaccard": 0.8}, lambda r: r["_cap_family"]),
    # a family's variants differ in case, punctuation and spacing only: exactly one normalised caption
    "caption_exact": ({"url": False, "image_sha256": False, "caption_exact": True}, lambda r: r["_cap_family"]),
    "image": (
        {"url": False, "image_sha256": False, "image_cosine": 0.95, "image_cluster_size": 5000},
        lambda r: r["_img_family"],
    ),
}


def _decide(corpus, dedup: dict, engine: str = "local") -> pl.DataFrame:
    _, ann, embeddings = corpus
    sel = SelectionConfig.model_validate({"name": "t", "engine": engine, "language": {"allow": ["en"]}, "dedup": dedup})
    return decide(ann.lazy(), sel, embeddings=embeddings.lazy())[0].collect()


@pytest.mark.parametrize("rule,column", RULES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_dedup_kind_keeps_the_survivor_the_rule_names(corpus, kind, rule, column):
    rows = corpus[0]
    dedup, group_of = KINDS[kind]
    d = _decide(corpus, {**dedup, "survivor": rule, "survivor_column": column})
    want = reference(rows, group_of, _eligible, rule, column)
    assert sum(1 for k, o, _ in want.values() if o is not None) > 100  # many duplicates to decide
    assert got(d) == want
    # duplicate_of always names a kept row
    kept = set(d.filter("kept")["uid"])
    assert set(d["duplicate_of"].drop_nulls()) <= kept


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_rules_pick_different_survivors(corpus, kind):
    """The choice matters on this data: no two rules keep the same rows (so the test above could
    not pass with the rule ignored)."""
    dedup, _ = KINDS[kind]
    kept = {
        (rule, column): frozenset(
            _decide(corpus, {**dedup, "survivor": rule, "survivor_column": column}).filter("kept")["uid"]
        )
        for rule, column in RULES
    }
    for a, b in itertools.combinations(RULES, 2):
        assert kept[a] != kept[b], (kind, a, b)


def test_first_is_keep_first_in_input_order_like_datatrove(corpus):
    """DataTrove / Data-Juicer exact dedup: walk the rows in input order, keep a key's first row."""
    rows = corpus[0]
    d = _decide(corpus, {"url": True, "image_sha256": False, "survivor": "first"})
    seen, keep = set(), set()
    for r in sorted(rows, key=lambda r: (r["shard"], r["row"])):
        if _eligible(r) and r["url_normalized"] not in seen:
            seen.add(r["url_normalized"])
            keep.add(r["uid"])
    assert set(d.filter("kept")["uid"]) == keep


@pytest.mark.parametrize("rule,column", [("best_score", None), ("first", None), ("priority", "pri_f")])
def test_all_dedups_together_point_at_a_better_kept_row(corpus, rule, column):
    """URL, sha256, caption and image dedup in one cascade: every removed duplicate names a kept
    row that comes before it in the rule's order (the order is total, so a chain of re-pointed
    survivors can only improve), and kept rows are unique on every key."""
    rows = corpus[0]
    by_uid = {r["uid"]: r for r in rows}
    d = _decide(
        corpus,
        {
            **KINDS["caption"][0],
            **KINDS["image"][0],
            "url": True,
            "image_sha256": True,
            "survivor": rule,
            "survivor_column": column,
        },
    )
    kept = d.filter("kept")
    dups = d.filter(pl.col("duplicate_of").is_not_null())
    assert set(dups["reason"]) == {"duplicate_url", "duplicate_image", "duplicate_caption", "duplicate_image_near"}
    assert set(dups["duplicate_of"]) <= set(kept["uid"])
    for u, of in dups.select("uid", "duplicate_of").iter_rows():
        assert ref_key(rule, column, by_uid[of]) < ref_key(rule, column, by_uid[u])
    k = [by_uid[u] for u in kept["uid"]]
    for key in ("url_normalized", "image_sha256", "_cap_family", "_img_family"):
        assert len({r[key] for r in k}) == len(k), key


@pytest.mark.parametrize("rule,column", [("first", None), ("priority", "pri_f")])
@pytest.mark.parametrize("kind", ["caption", "image"])
def test_ray_engine_honours_the_survivor_rule(corpus, ray_session, kind, rule, column):
    """selection.engine = "ray" moves only the candidate / edge search; the survivor is the same rule."""
    dedup = {**KINDS[kind][0], "survivor": rule, "survivor_column": column}
    on_ray = _decide(corpus, {**dedup, "partitions": 3}, engine="ray")
    assert got(on_ray) == reference(corpus[0], KINDS[kind][1], _eligible, rule, column)
    assert on_ray.select(OUT).sort("uid").equals(_decide(corpus, dedup).select(OUT).sort("uid"))


def test_priority_ties_nulls_and_nan():
    rows = [
        {"pri": float("nan"), "clip_score": 0.9},  # NaN ranks last, like null: not "the highest"
        {"pri": None, "clip_score": 0.8},
        {"pri": 0.5, "clip_score": 0.1},
        {"pri": 0.5, "clip_score": 0.3},  # tie on priority: the better score wins, as best_score
        {"pri": 0.2, "clip_score": 0.95},
    ]
    recs = [
        {
            "shard": "s",
            "row": i,
            "uid": f"{i:032x}",
            "url": "http://x/",
            "url_normalized": "http://x/",
            "fetch_status": "ok",
            **r,
        }
        for i, r in enumerate(rows)
    ]
    ann = pl.from_arrow(conform(pa.Table.from_pylist(recs), keep_columns=["pri"])).lazy()
    sel = SelectionConfig.model_validate({"dedup": {"survivor": "priority", "survivor_column": "pri"}})
    d = decide(ann, sel)[0].collect().sort("row")
    assert d["kept"].to_list() == [False, False, False, True, False]
    assert set(d["duplicate_of"].drop_nulls()) == {f"{3:032x}"}
    # the default rule on the same rows: the best score (0.95) wins
    d = decide(ann, SelectionConfig())[0].collect().sort("row")
    assert d["kept"].to_list() == [False, False, False, False, True]


def test_survivor_config_is_validated():
    assert SelectionConfig().dedup.survivor == "best_score" and SelectionConfig().dedup.survivor_column is None
    with pytest.raises(SpecError, match="survivor_column"):
        parse_spec({**MINIMAL, "selection": {"dedup": {"survivor": "priority"}}})
    with pytest.raises(SpecError, match="only used with dedup.survivor = 'priority'"):
        parse_spec({**MINIMAL, "selection": {"dedup": {"survivor": "first", "survivor_column": "pri"}}})
    with pytest.raises(SpecError, match="survivor"):
        parse_spec({**MINIMAL, "selection": {"dedup": {"survivor": "last"}}})
    ok = parse_spec({**MINIMAL, "selection": {"dedup": {"survivor": "priority", "survivor_column": "pri"}}})
    assert ok.selection.dedup.survivor_column == "pri"


def test_a_priority_column_the_annotations_lack_is_a_clear_error(corpus):
    ann = corpus[1].lazy()
    sel = SelectionConfig.model_validate({"dedup": {"survivor": "priority", "survivor_column": "popularity"}})
    with pytest.raises(ValueError, match=r"'popularity' is not a column of the annotations.*keep_columns"):
        decide(ann, sel)
    sel = SelectionConfig.model_validate({"dedup": {"survivor": "priority", "survivor_column": "caption"}})
    with pytest.raises(ValueError, match=r"'caption' has type String.*numeric"):
        decide(ann, sel)


# --------------------------------------------------------------------------------------------------
# (b) caption_words, CJK-aware

_CJK_CHAR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}ーｰ]")


def ref_words(caption: str | None) -> int:
    """An independent loop: whitespace words; inside a word holding Han/kana, each such character
    is a word and so is each maximal run of other characters that holds a letter or digit."""
    n = 0
    for word in (caption or "").split():
        if not _CJK_CHAR.search(word):
            n += 1
            continue
        run = ""
        for ch in word + "\0":
            if ch == "\0" or _CJK_CHAR.match(ch):
                n += any(c.isalnum() for c in run)
                run = ""
                n += ch != "\0"
            else:
                run += ch
    return n


REAL = [
    # Chinese: no spaces, one word per character
    ("一只猫坐在窗台上", 8),  # a cat sits on the windowsill
    ("北京烤鸭很好吃", 7),
    ("山水双挖 (landscape) (2 works) by zhang fuyang", 10),  # LAION
    # Japanese: kanji and kana are words, the long-vowel mark is a kana character, 「」。 are not words
    ("東京タワーの夜景", 8),
    ("「猫」が好きです。", 6),
    ("CHIMERA GAMESのアーカイブ画像:Vol.7FMX NIGHT SESSION", 13),  # LAION: GAMES + 8 + ":Vol.7FMX"
    ("画像1: 1900-10's Mini Tin Case 【Colgate & Co. Shaving Stick New York】 (1)", 15),  # LAION
    # Korean: written with spaces, counted like Latin words
    ("서울의 아름다운 야경 사진", 4),
    ("Korean calligraphy 향수 정지용", 4),  # LAION
    ("Hair Extension 220 Grams에 있는 두 배 Drawn Remy Clip", 10),  # LAION
    # Thai: no spaces and no segmenter: a run is one word (documented; use min_chars)
    ("ตลาดน้ำดำเนินสะดวก", 1),
    ("Refresh Extra Care Deodorant Spray 1 ขวด 60 ml", 9),  # LAION
    # unchanged for everything else
    ("a photo of a dog - on the beach", 9),
    ("", 0),
    (None, 0),
]


def test_caption_words_on_real_chinese_japanese_korean_thai_and_mixed_captions():
    caps = [c for c, _ in REAL]
    assert caption_word_counts(pl.Series(caps, dtype=pl.String)).to_list() == [n for _, n in REAL]
    assert [ref_words(c) for c in caps] == [n for _, n in REAL]


def test_caption_words_equal_the_reference_on_laion_and_whitespace_words_elsewhere(laion_sample):
    caps = pl.read_parquet(laion_sample, columns=["TEXT"]).get_column("TEXT")
    new = caption_word_counts(caps).to_list()
    old = caps.fill_null("").str.extract_all(r"\S+").list.len().to_list()
    has_cjk = [bool(_CJK_CHAR.search(c or "")) for c in caps.to_list()]
    assert 20 <= sum(has_cjk) < 100
    assert new == [ref_words(c) for c in caps.to_list()]
    # only captions with Han or kana count differently; every other caption exactly as before
    assert all(n == o for n, o, h in zip(new, old, has_cjk) if not h)
    assert all(n >= o for n, o, h in zip(new, old, has_cjk) if h)
    assert sum(n > o for n, o, h in zip(new, old, has_cjk) if h) >= 20


def test_min_words_no_longer_removes_chinese_and_japanese_captions():
    caps = ["北京烤鸭很好吃", "東京タワーの夜景", "서울의 아름다운 야경 사진", "cat", "two words"]
    t = pa.table(
        {
            "shard": ["s"] * 5,
            "row": list(range(5)),
            "uid": [f"{i:032x}" for i in range(5)],
            "url": [f"http://x/{i}" for i in range(5)],
            "caption": caps,
        }
    )
    out = pl.from_arrow(conform(annotate_text(t, language=False)))
    assert out["caption_words"].to_list() == [7, 8, 4, 1, 2]
    d = decide(out.lazy(), SelectionConfig.model_validate({"caption": {"min_words": 3}}))[0].collect().sort("row")
    assert d["reason"].to_list() == [None, None, None, "caption_length", "caption_length"]


# --------------------------------------------------------------------------------------------------
# (c) unverified caption near-dup: refused unless the bands are precise


def _pairs_at(jaccard_overlap: int, size: int, n_pairs: int) -> list[str]:
    """n_pairs caption pairs of `size` distinct tokens each sharing `jaccard_overlap` tokens
    (unigram Jaccard = overlap / (2 size - overlap)); tokens never repeat across pairs."""
    caps = []
    for p in range(n_pairs):
        toks = [f"t{p}x{i}" for i in range(2 * size - jaccard_overlap)]
        caps += [" ".join(toks[:size]), " ".join(toks[size - jaccard_overlap :])]
    return caps


def test_the_13_7_percent_case_is_refused_with_what_to_set():
    """annotate threshold 0.7 at 256 permutations = 32 bands x 8 rows: a pair at Jaccard 0.51 is a
    candidate 13.7% of the time; with caption_verify = false every candidate was merged."""
    assert cm.lsh_params(0.7, 256) == (32, 8)
    assert cm.candidate_probability(0.51, 32, 8) == pytest.approx(0.137, abs=0.0005)
    spec = {
        **MINIMAL,
        "annotate": {"caption_minhash": True, "caption_minhash_perm": 256, "caption_minhash_threshold": 0.7},
        "selection": {"dedup": {"caption_jaccard": 0.7, "caption_verify": False}},
    }
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "caption_verify = true" in msg and "32 bands x 8 rows" in msg and "11.8%" in msg
    # the suggested threshold is accepted, and is the smallest on the 0.01 grid that is
    t = float(re.search(r"caption_minhash_threshold = ([0-9.]+) \(", msg).group(1))
    spec["annotate"]["caption_minhash_threshold"] = t
    parse_spec(spec)
    spec["annotate"]["caption_minhash_threshold"] = round(t - 0.01, 2)
    with pytest.raises(SpecError):
        parse_spec(spec)
    # verification on: the recall-tuned bands are fine (the default)
    spec["annotate"]["caption_minhash_threshold"] = 0.7
    spec["selection"]["dedup"]["caption_verify"] = True
    parse_spec(spec)
    # `curate select` validates the run's stored spec the same way (cli.select: PipelineSpec.model_validate)
    stored = PipelineSpec.model_validate(spec).model_dump(mode="json")
    stored["selection"]["dedup"]["caption_verify"] = False
    with pytest.raises(ValueError, match="caption_verify"):
        PipelineSpec.model_validate(stored)


def test_the_default_bands_are_refused_unverified_too_and_the_bound_is_checked_exactly():
    base = {**MINIMAL, "annotate": {"caption_minhash": True}}
    with pytest.raises(SpecError, match=r"14 bands x 9 rows.*13\.2%.*caption_minhash_threshold = 0\.88"):
        parse_spec({**base, "selection": {"dedup": {"caption_jaccard": 0.8, "caption_verify": False}}})
    # the bound itself, from (b, r) by 1 - (1 - s^r)^b, at caption_jaccard - 0.2
    for jac, thr, perm in itertools.product((0.6, 0.8, 0.9, 1.0), (0.5, 0.8, 0.9, 0.95), (64, 128)):
        b, r = cm.lsh_params(thr, perm)
        precise = 1 - (1 - max(0.0, jac - 0.2) ** r) ** b <= 0.01
        assert (cm.unverified_bands_problem(jac, thr, perm) is None) == precise, (jac, thr, perm)
    # caption dedup off: nothing to check
    parse_spec({**base, "selection": {"dedup": {"caption_verify": False}}})


def test_the_formula_describes_the_band_keys_and_what_decide_merges_unverified():
    """Measured on real signatures: 2,000 caption pairs at unigram Jaccard exactly 0.51 share a
    band key about 13.7% of the time with 32 x 8 bands (the refused spec) and rarely with the
    bands of the suggested threshold; decide() without verification merges exactly the pairs that
    share a key, with verification none (0.51 < 0.7)."""
    n_pairs = 2000
    caps = _pairs_at(102, 151, n_pairs)  # 102 / (302 - 102) = 0.51
    sig, _ = cm.signatures(caps, 256, ngram=1)
    for thr, perm, expect in ((0.7, 256, 0.1365), (0.81, 256, None)):
        b, r = cm.lsh_params(thr, perm)
        p = cm.candidate_probability(0.51, b, r)
        if expect is not None:
            assert p == pytest.approx(expect, abs=0.0005)
        keys = cm.band_keys(sig, b, r)
        shared = (keys[0::2] == keys[1::2]).any(axis=1)
        sd = math.sqrt(p * (1 - p) / n_pairs)
        assert abs(shared.mean() - p) <= 4 * sd + 0.002, (thr, shared.mean(), p)
        if expect is None:
            continue
        t = pa.table(
            {
                "shard": ["s"] * len(caps),
                "row": list(range(len(caps))),
                "uid": [f"{i:032x}" for i in range(len(caps))],
                "url": [f"http://x/{i}" for i in range(len(caps))],
                "caption": caps,
                "fetch_status": ["ok"] * len(caps),
                "clip_score": [0.3] * len(caps),
            }
        )
        t = t.append_column("caption_lsh", cm.caption_lsh(pl.Series(caps), thr, perm, ngram=1))
        # the keys' shingle size is recorded beside them (annotate.caption_ngram), as annotation writes it
        ann = pl.from_arrow(conform(t)).with_columns(pl.lit(1, pl.Int8).alias("caption_lsh_ngram")).lazy()
        for verify, merged in ((False, int(shared.sum())), (True, 0)):
            sel = SelectionConfig.model_validate({"dedup": {"caption_jaccard": 0.7, "caption_verify": verify}})
            d = decide(ann, sel)[0].collect()
            assert int((d["reason"] == "duplicate_caption").sum()) == merged


@pytest.mark.parametrize("rule,column", [("first", None), ("priority", "pri")])
def test_a_report_with_another_survivor_rule_says_why_it_has_no_sweep(corpus, rule, column):
    """The exact sweep stands on best_score survivors (reports/sweep.py): with another rule the
    report is still written, its sweep section says why it is absent, and `curate sweep` refuses
    by name instead of printing figures that decide() would not give."""
    from curate.reports.audit import build_audit
    from curate.reports.sweep import sweep

    _, ann, _ = corpus
    sel = SelectionConfig.model_validate(
        {
            "name": "t",
            "language": {"allow": ["en"]},
            "clip": {"min_score": 0.2},
            "dedup": {"url": True, "survivor": rule, "survivor_column": column},
        }
    )
    decisions, resolved = decide(ann.lazy(), sel)
    report, _ = build_audit(decisions, ann.lazy(), sel, resolved.clip_threshold)
    assert report["sweep"] is None and "survivor" in report["sweep_note"]
    assert report["totals"]["kept"] == decisions.collect()["kept"].sum()
    with pytest.raises(ValueError, match="survivor"):
        sweep(ann.lazy(), sel, [0.1, 0.2])
