"""Near-duplicate captions: MinHash LSH band keys per shard (curate/stages/caption_minhash.py) and
the global clustering in selection (filters/caption_dedup.py), against exact brute force."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from scipy.sparse import csr_matrix, triu

from curate.annotations import conform
from curate.config import SelectionConfig
from curate.filters.decide import decide
from curate.stages import caption_minhash as cm

THRESHOLD = 0.8


def test_signature_equals_datasketch_minhash_update():
    from datasketch import MinHash

    caps = [
        "A red dress for women",
        "a RED dress, for women!",
        "北京烤鸭很好吃",
        "x",
        None,
        "",
        "one two three four five",
    ]
    rows, hv = cm.shingle_hashes(caps)
    sig, has = cm.signatures(caps, chunk=3)  # tiny chunks: the chunking must not change anything
    assert has.tolist() == [True, True, True, True, False, False, True]
    assert (sig[0] == sig[1]).all()  # normalisation: case and punctuation
    for i in range(len(caps)):
        m = MinHash(num_perm=128, seed=1, scheme="affine32", hashfunc=lambda x: x)
        for v in hv[rows == i]:
            m.update(int(v))
        assert (m.hashvalues == sig[i]).all()
    # CJK: one token per character, so bigrams are character bigrams (7 chars -> 6 shingles)
    assert (rows == 2).sum() == 6
    # fewer tokens than n: one shingle, the whole caption
    assert (rows == 3).sum() == 1


def ann_table(captions, shard="s", scores=None, uid_prefix="") -> pa.Table:
    n = len(captions)
    scores = scores if scores is not None else np.random.default_rng(0).uniform(0.2, 0.4, n).tolist()
    t = pa.table(
        {
            "shard": [shard] * n,
            "row": list(range(n)),
            "uid": [f"{uid_prefix}{shard}{i:020d}"[-32:].rjust(32, "0") for i in range(n)],
            "caption": captions,
            "fetch_status": ["not_needed"] * n,
            "clip_score": pa.array(scores, pa.float32()),
            "url": [f"http://x.test/{shard}/{i}.jpg" for i in range(n)],  # every row has a URL (else: missing_url)
        }
    )
    t = t.append_column("caption_lsh", cm.caption_lsh(pl.Series(captions, dtype=pl.String).fill_null(""), THRESHOLD))
    return conform(t)


def cap_sel(**kw) -> SelectionConfig:
    return SelectionConfig(
        dedup={"url": False, "image_sha256": False, "caption_jaccard": THRESHOLD, **kw.pop("dedup", {})}, **kw
    )


def _edit(words, rate, rng, vocab):
    words = list(words)
    for _ in range(max(1, int(round(rate * len(words))))):
        op = rng.integers(3)
        j = int(rng.integers(len(words)))
        if op == 0:
            words[j] = vocab[int(rng.integers(len(vocab)))]
        elif op == 1 and len(words) > 2:
            del words[j]
        else:
            words.insert(j, vocab[int(rng.integers(len(vocab)))])
    return " ".join(words)


def brute_force_pairs(captions, min_j):
    """Every pair with exact Jaccard >= min_j on the very shingles the signatures use."""
    rows, hv = cm.shingle_hashes(pl.Series(captions, dtype=pl.String).fill_null(""))
    _, col = np.unique(hv, return_inverse=True)
    x = csr_matrix((np.ones(rows.size, np.int32), (rows, col)), shape=(len(captions), col.max() + 1))
    x.data[:] = 1
    x.sum_duplicates()
    x.data = np.minimum(x.data, 1)
    size = np.asarray(x.sum(axis=1)).ravel()
    inter = triu(x @ x.T, k=1).tocoo()
    j = inter.data / (size[inter.row] + size[inter.col] - inter.data)
    keep = j >= min_j
    return inter.row[keep], inter.col[keep], j[keep], (x, size)


def exact_j(x, size, a, b):
    inter = np.asarray(x[a].multiply(x[b]).sum(axis=1)).ravel()
    return inter / (size[a] + size[b] - inter)


@pytest.fixture(scope="module")
def laion_captions(laion_sample):
    """The LAION sample + 2,500 injected near-duplicates (upper-cased, or 2-20% of words edited)."""
    rng = np.random.default_rng(7)
    base = pl.read_parquet(laion_sample, columns=["TEXT"]).get_column("TEXT").fill_null("").to_list()
    vocab = [w for c in base[:2000] for w in c.split()]
    long_enough = [c for c in base if len(c.split()) >= 8]
    injected = []
    for i, c in enumerate(rng.choice(long_enough, 2500, replace=False)):
        rate = [0.0, 0.02, 0.05, 0.1, 0.2][i % 5]
        injected.append(_edit(c.split(), rate, rng, vocab) if rate else c.upper())
    captions = base + injected
    assert len(captions) >= 12_000
    return captions


def test_quality_vs_brute_force_on_laion_with_injected_near_duplicates(laion_captions):
    captions = laion_captions

    d, _ = decide(pl.from_arrow(ann_table(captions)).lazy(), cap_sel())
    d = d.collect().sort("row")
    uid = d["uid"].to_numpy()
    kept = d["kept"].to_numpy()
    of = d["duplicate_of"].to_list()
    removed = d["reason"].to_numpy() == "duplicate_caption"
    # every removed duplicate points at a kept row
    kept_uids = set(uid[kept])
    assert all(of[i] in kept_uids for i in np.flatnonzero(removed))
    cluster = np.array([of[i] if removed[i] else uid[i] for i in range(len(uid))])

    a, b, j, (x, size) = brute_force_pairs(captions, THRESHOLD - 0.2)
    hi = j >= THRESHOLD + 0.05
    recall = float((cluster[a[hi]] == cluster[b[hi]]).mean())
    assert hi.sum() > 500, hi.sum()
    assert recall >= 0.95, recall
    # reported pairs: each removed row with its survivor (transitive merges included)
    uid_row = {u: i for i, u in enumerate(uid)}
    ra = np.flatnonzero(removed)
    rb = np.array([uid_row[of[i]] for i in ra])
    rj = exact_j(x, size, ra, rb)
    low = float((rj < THRESHOLD - 0.1).mean())
    assert low <= 0.05, low
    print(
        f"pairs J>={THRESHOLD + 0.05}: {hi.sum()}, recall {recall:.4f}; removed {ra.size}, "
        f"reported pairs below {THRESHOLD - 0.1}: {low:.4f}, min J {rj.min():.3f}"
    )


def test_a_pair_split_across_two_shards_is_found(tmp_path):
    caps_a = ["a cozy cabin in the snowy mountains at dusk", "red sports car on a race track"]
    caps_b = ["vintage typewriter on a wooden desk", "a cozy cabin in the snowy mountains at dusk!!"]
    for shard, caps, scores in (("part-00003", caps_a, [0.3, 0.3]), ("part-09000", caps_b, [0.3, 0.35])):
        pa.parquet.write_table(ann_table(caps, shard, scores), tmp_path / f"{shard}.parquet")
    frame = pl.scan_parquet([tmp_path / "part-00003.parquet", tmp_path / "part-09000.parquet"])
    d = decide(frame, cap_sel())[0].collect()
    removed = d.filter(pl.col("reason") == "duplicate_caption")
    assert removed.select("shard", "row").rows() == [("part-00003", 0)]
    survivor = d.filter((pl.col("shard") == "part-09000") & (pl.col("row") == 1))
    assert removed["duplicate_of"][0] == survivor["uid"][0] and survivor["kept"][0]
    # off by default: the same annotations select as before
    assert decide(frame, SelectionConfig(dedup={"url": False, "image_sha256": False}))[0].collect()["kept"].all()


def test_survivor_follows_the_selection_without_recomputing_signatures():
    caps = ["sunset over the ocean with palm trees"] * 2 + ["Sunset over the ocean with palm trees."]
    t = ann_table(caps, scores=[0.9, 0.5, 0.4])
    t = t.set_column(t.schema.get_field_index("language"), "language", pa.array(["fr", "en", "en"]))
    frame = pl.from_arrow(t).lazy()
    d1 = decide(frame, cap_sel(clip={"min_score": 0.3}))[0].collect().sort("row")
    assert d1["kept"].to_list() == [True, False, False] and d1["duplicate_of"][1] == d1["uid"][0]
    d2 = decide(frame, cap_sel(clip={"min_score": 0.3}, language={"allow": ["en"]}))[0].collect().sort("row")
    assert d2["reason"].to_list() == ["language", None, "duplicate_caption"]
    assert d2["duplicate_of"][2] == d2["uid"][1]
    d3 = decide(frame, cap_sel(clip={"min_score": 0.45}, language={"allow": ["en"]}))[0].collect().sort("row")
    assert d3["reason"].to_list() == ["language", None, "clip_score"]  # a clip failure is not a duplicate
    d4 = decide(frame, cap_sel(clip={"min_score": 0.95}))[0].collect().sort("row")
    assert d4["reason"].to_list() == ["clip_score"] * 3 and d4["duplicate_of"].null_count() == 3


def test_url_duplicate_whose_survivor_loses_caption_dedup_points_at_the_final_survivor():
    caps = ["a bowl of ramen with egg", "a bowl of ramen with egg", "A bowl of ramen, with egg"]
    t = ann_table(caps, scores=[0.3, 0.5, 0.9])
    t = t.set_column(t.schema.get_field_index("url_normalized"), "url_normalized", pa.array(["u1", "u1", "u2"]))
    d = decide(pl.from_arrow(t).lazy(), cap_sel(dedup={"url": True}))[0].collect().sort("row")
    assert d["reason"].to_list() == ["duplicate_url", "duplicate_caption", None]
    assert d["duplicate_of"].to_list() == [d["uid"][2], d["uid"][2], None]


def test_old_annotations_without_signatures_still_select():
    t = ann_table(["same caption here", "same caption here"]).drop_columns(["caption_lsh"])
    d = decide(pl.from_arrow(t).lazy(), cap_sel())[0].collect()
    assert d["kept"].all()


def test_duplicate_cluster_names_the_group_on_every_member():
    caps = [
        "a bowl of ramen with egg",
        "A bowl of ramen, with egg",
        "a plate of spaghetti with basil",
        "a bowl of ramen with egg!",
    ]
    d = decide(pl.from_arrow(ann_table(caps, scores=[0.3, 0.9, 0.5, 0.4])).lazy(), cap_sel())[0].collect().sort("row")
    survivor = d["uid"][1]
    assert d["kept"].to_list() == [False, True, True, False]
    assert d["duplicate_cluster"].to_list() == [survivor, survivor, None, survivor]
    assert d["duplicate_of"].to_list() == [survivor, None, None, survivor]
