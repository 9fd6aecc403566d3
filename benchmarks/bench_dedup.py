"""Caption near-dedup benchmark (results in docs/DEDUP.md).

1. Caption signatures (curate.stages.caption_minhash.signatures) vs the plain datasketch way: one
   MinHash per caption, `update(shingle.encode())` per shingle -- same captions, same shingles,
   one run, ratio printed.
2. 1M captions deduplicated end to end: band keys for every caption (as the prepare step makes
   them, in shards of 100k) + decide() with dedup.caption_jaccard (the global step), wall time.
   The Ray engine's caption and image steps are measured against pool size by
   bench_select_scale.py (docs/SCALE.md).

The 1M captions: LAION sample captions, each used ~90 times with 1-4 random word edits from the
sample's own vocabulary (so most rows are distinct but share vocabulary and templates), plus 10%
injected near-duplicates (0-10% word edits) of random rows.

  .venv/bin/python benchmarks/bench_dedup.py [--rows 1000000] [--compare 20000] [--images 200000]

3. --images N: image near-dedup (k-means + in-cluster cosine) on N synthetic embeddings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curate.annotations import conform
from curate.config import SelectionConfig
from curate.filters.decide import decide
from curate.stages import caption_minhash as cm

LAION = str(Path(__file__).resolve().parent.parent / "data" / "laion-sample" / "laion_10000.parquet")


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    base = [c for c in pl.read_parquet(LAION, columns=["TEXT"]).get_column("TEXT").fill_null("").to_list() if c.split()]
    vocab = np.array([w for c in base for w in c.split()])
    n_base = int(n * 0.9)
    out = []
    picks = rng.integers(len(base), size=n_base)
    n_edits = rng.integers(1, 5, size=n_base)
    for p, k in zip(picks, n_edits):
        w = base[p].split()
        for j in rng.integers(len(w), size=k):
            w[j] = vocab[rng.integers(vocab.size)]
        out.append(" ".join(w))
    for p in rng.integers(n_base, size=n - n_base):
        w = out[p].split()
        k = int(round(len(w) * rng.choice([0.0, 0.05, 0.1])))
        for j in rng.integers(len(w), size=k):
            w[j] = vocab[rng.integers(vocab.size)]
        out.append(" ".join(w))
    return out


def datasketch_loop(captions: list[str], num_perm: int, ngram: int) -> list:
    """The per-caption datasketch way, on the same shingles (strings of the same tokens)."""
    from datasketch import MinHash

    toks = pl.Series(captions).str.normalize("NFKC").str.to_lowercase().str.extract_all(cm.TOKEN_PATTERN).to_list()
    perms = MinHash(num_perm=num_perm, seed=1, scheme="affine32").permutations
    out = []
    for t in toks:
        if not t:
            out.append(None)
            continue
        sh = [" ".join(t[i : i + ngram]) for i in range(max(1, len(t) - ngram + 1))]
        m = MinHash(num_perm=num_perm, scheme="affine32", permutations=perms)
        for s in sh:
            m.update(s.encode())
        out.append(m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--compare", type=int, default=20_000)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument(
        "--images", type=int, default=0, help="also time image near-dedup on this many synthetic embeddings"
    )
    args = ap.parse_args()

    t = time.perf_counter()
    caps = make_captions(args.rows)
    print(f"generated {len(caps):,} captions in {time.perf_counter() - t:.1f} s")

    sub = caps[: args.compare]
    cm.signatures(sub[:100])  # warm-up both sides: imports, regex compilation, permutations
    datasketch_loop(sub[:100], 128, cm.DEFAULT_NGRAM)
    t = time.perf_counter()
    cm.signatures(sub)
    t_vec = time.perf_counter() - t
    t = time.perf_counter()
    datasketch_loop(sub, 128, cm.DEFAULT_NGRAM)
    t_loop = time.perf_counter() - t
    print(
        f"signatures, {len(sub):,} captions, 128 perm: vectorised {t_vec:.2f} s, datasketch update loop {t_loop:.2f} s, "
        f"ratio {t_loop / t_vec:.1f}x"
    )

    t0 = time.perf_counter()
    tables = []
    rng = np.random.default_rng(1)
    for k, lo in enumerate(range(0, len(caps), args.shard_rows)):
        chunk = caps[lo : lo + args.shard_rows]
        n = len(chunk)
        tab = pa.table(
            {
                "shard": [f"part-{k:05d}"] * n,
                "row": np.arange(n),
                "uid": [f"{lo + i:032x}" for i in range(n)],
                "caption": chunk,
                "fetch_status": ["not_needed"] * n,
                "clip_score": pa.array(rng.uniform(0.1, 0.4, n), pa.float32()),
            }
        )
        tables.append(conform(tab.append_column("caption_lsh", cm.caption_lsh(pl.Series(chunk)))))
    t_sig = time.perf_counter() - t0
    frame = pl.from_arrow(pa.concat_tables(tables)).lazy()
    t = time.perf_counter()
    sel = SelectionConfig(dedup={"caption_jaccard": 0.8, "url": False, "image_sha256": False})
    d = decide(frame, sel)[0].select("kept", "reason").collect()
    t_global = time.perf_counter() - t
    removed = int((d["reason"] == "duplicate_caption").sum())
    b, r = cm.lsh_params(0.8, 128)
    print(
        f"end to end, {len(caps):,} captions: band keys {t_sig:.1f} s ({len(caps) / t_sig:,.0f} rows/s, b={b} r={r}), "
        f"global step (decide) {t_global:.1f} s, total {t_sig + t_global:.1f} s; removed as duplicate_caption {removed:,}"
    )
    if args.images:
        bench_images(args.images)


def bench_images(n: int, d: int = 512, seed: int = 0) -> None:
    """Image near-dedup (k-means + in-cluster cosine) on n synthetic unit embeddings: 90% random
    directions (distinct images), 10% noisy copies of them (cosine ~0.97, re-encodes)."""
    from curate.filters.image_dedup import image_duplicates

    rng = np.random.default_rng(seed)
    n_base = int(n * 0.9)
    x = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.integers(n_base, size=n - n_base)
    x[n_base:] = x[src] + 0.25 * rng.standard_normal((n - n_base, d)).astype(np.float32) * np.linalg.norm(
        x[src], axis=1, keepdims=True
    ) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pool = pl.DataFrame(
        {
            "_i": np.arange(n, dtype=np.uint32),
            "image_embedding": pl.Series(list(x.astype(np.float32))).cast(pl.List(pl.Float32)),
            "clip_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "uid": [f"{i:032x}" for i in range(n)],
            "shard": ["s"] * n,
            "row": np.arange(n, dtype=np.int64),
        }
    )
    t = time.perf_counter()
    dups = image_duplicates(pool, 0.95, cluster_size=1000, iters=10, seed=0)
    dt = time.perf_counter() - t
    removed = set(dups["_i"].to_list())
    copies_found = sum(1 for i, s in zip(range(n_base, n), src) if i in removed or s in removed)
    print(
        f"image near-dedup, {n:,} embeddings (d={d}, k={-(-n // 1000)} clusters, 10 k-means rounds): {dt:.1f} s; "
        f"copies found {copies_found / (n - n_base):.3f}; distinct rows removed {len(removed & set(range(n_base))) - len(set(src.tolist()) & removed)}"
    )


if __name__ == "__main__":
    main()
