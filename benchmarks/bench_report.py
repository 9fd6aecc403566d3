"""Benchmark: the audit report (counts, per-group stats, per-group CLIP distributions) plus the exact
CLIP sweep (26 thresholds, representatives via decide()) over N annotation rows (default 10 M).

    .venv/bin/python benchmarks/bench_report.py [--rows 10000000] [--dir /tmp/curate-bench]

Writes N rows of synthetic decided annotations as 10 parquet shards (once), then times, from a
lazy scan: build_report (domain, tld, language, source groupings) and sweep (domain, language).
Reports wall time and peak RSS (ru_maxrss of this process)."""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import polars as pl


def make(path: str, rows: int, shards: int = 10) -> None:
    os.makedirs(path, exist_ok=True)
    per = rows // shards
    rng = np.random.default_rng(0)
    langs = np.array(["en", "de", "fr", "es", "pl", "ja", "zh", "pt", "it", "ru"])
    reasons = ["language", "caption_length", "fetch_failed", "clip_score", "duplicate_url"]
    for s in range(shards):
        p = f"{path}/part-{s:05d}.parquet"
        if os.path.exists(p):
            continue
        n = per
        dom = rng.zipf(1.3, n) % 200_000
        lang = langs[np.minimum(rng.geometric(0.35, n) - 1, 9)]
        score = rng.normal(0.3, 0.06, n).astype(np.float32)
        r = rng.random(n)
        first = np.where(
            r < 0.10, 0, np.where(r < 0.15, 1, np.where(r < 0.22, 2, np.where(r < 0.45, 3, np.where(r < 0.48, 4, -1))))
        )
        reason = np.array(reasons + [None], dtype=object)[first]
        df = pl.DataFrame(
            {
                "shard": f"part-{s:05d}",
                "row": np.arange(n, dtype=np.int64),
                "uid": pl.Series(rng.integers(0, 2**62, n)).cast(pl.String).str.zfill(32),
                "caption": "a caption",
                "language": lang,
                "language_score": np.float32(0.9),
                "caption_chars": np.int32(40),
                "caption_words": np.where(first == 1, 1, 6).astype(np.int32),
                "domain": pl.Series(dom).cast(pl.String) + ".com",
                "tld": "com",
                "url_normalized": pl.Series(rng.integers(0, int(rows * 0.97), n)).cast(pl.String),
                # every row has a URL (the missing-URL rule reads it; the key is url_normalized)
                "url": "https://example.com/",
                "fetch_status": np.where(first == 2, "download_failed", "ok"),
                "original_width": np.int32(256),
                "original_height": np.int32(256),
                "image_sha256": pl.Series(rng.integers(0, int(rows * 0.99), n)).cast(pl.String),
                "clip_score": score,
                "source": np.array(["cc", "web", "shop"])[rng.integers(0, 3, n)],
                "kept": first < 0,
                "reason": pl.Series(reason.tolist(), dtype=pl.String),
            }
        ).with_columns(
            pl.when(pl.col("language").is_in(["en", "de", "fr", "es", "pl"]))
            .then(pl.col("language"))
            .otherwise(pl.col("language")),
            pl.when(pl.col("reason").is_null())
            .then(pl.lit([], pl.List(pl.String)))
            .otherwise(pl.concat_list(pl.col("reason")))
            .alias("reasons"),
        )
        df.write_parquet(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dir", default="/tmp/curate-bench")
    a = ap.parse_args()
    from curate.config import SelectionConfig
    from curate.reports.summary import build_report
    from curate.reports.sweep import sweep, thresholds

    path = f"{a.dir}/{a.rows}"
    t = time.time()
    make(path, a.rows)
    print(f"data ready in {time.time() - t:.1f}s at {path}")
    lf = pl.scan_parquet(f"{path}/*.parquet")
    t0 = time.time()
    rep = build_report(lf, extra_group_columns=("source",), top_groups=25)
    t1 = time.time()
    sel = SelectionConfig(language={"allow": ["en", "de", "fr", "es", "pl"]}, caption={"min_words": 2})
    sw = sweep(lf, sel, thresholds(0.15, 0.40, 0.01), group_columns=["domain", "language"])
    t2 = time.time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"rows {rep['totals']['rows_in']:,}; domains {rep['groups']['domain']['distinct']:,}; "
        f"flagged domains {rep['groups']['domain']['flagged_groups']:,}"
    )
    print(f"report {t1 - t0:.1f}s, sweep (26 thresholds) {t2 - t1:.1f}s, total {t2 - t0:.1f}s; peak RSS {rss:,.0f} MiB")
    print("retention at 0.15/0.28/0.40:", [round(sw["overall"]["retention"][i], 4) for i in (0, 13, 25)])


if __name__ == "__main__":
    main()
