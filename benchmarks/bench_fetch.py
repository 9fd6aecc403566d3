"""Fetch throughput and memory: curate's guarded fetch vs plain img2dataset, same shard, same threads.

    .venv/bin/python benchmarks/bench_fetch.py [--rows 600] [--threads 16] [--rounds 3] [--memory]

Throughput: one ImageServer on 127.0.0.1 serves `rows` distinct JPEGs (256-768 px, realistic
sizes); each round runs img2dataset's Downloader.download_shard (its own urllib download loop,
Resizer and parquet writer) and curate's fetch_shard (guarded fetcher + checks + the same
Resizer) on the same rows, alternating which goes first. Reports images/s (median of rounds) and
the ratio curate / img2dataset.

Memory (--memory): every URL serves a 50 MB body (a valid JPEG plus padding); curate fetches a
shard of them in a child process with max_bytes 64 MB, and the child's peak RSS is reported,
against its RSS after importing everything.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from curate.config import FetchConfig  # noqa: E402
from curate.demo.image_server import ImageServer  # noqa: E402
from curate.stages.fetch import _make_resizer, fetch_shard  # noqa: E402


def images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(256, 768)), int(rng.integers(256, 768))
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def run_img2dataset(urls: list[str], threads: int, timeout: float) -> float:
    from img2dataset import downloader, writer

    tmp = tempfile.mkdtemp(prefix="bench-i2d-")
    try:
        table = pa.table({"url": urls, "row": list(range(len(urls)))})
        path = os.path.join(tmp, "in.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        os.makedirs(os.path.join(tmp, "out"))
        d = downloader.Downloader(
            sample_writer_class=writer.ParquetSampleWriter, resizer=_make_resizer(FetchConfig(image_size=256)),
            thread_count=threads, save_caption=False, extract_exif=False, output_folder=os.path.join(tmp, "out"),
            column_list=["url", "row"], timeout=timeout, number_sample_per_shard=max(len(urls), 10), oom_shard_count=1,
            compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=0, user_agent_token="curate",
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        )  # fmt: skip
        t0 = time.perf_counter()
        d.download_shard((0, path))
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_curate(urls: list[str], threads: int, timeout: float) -> float:
    cfg = FetchConfig(
        threads=threads,
        timeout_s=timeout,
        retries=0,
        image_size=256,
        per_domain_concurrency=threads,
        allow_networks=["127.0.0.0/8"],
    )
    rows = pa.table({"row": list(range(len(urls))), "url": urls})
    t0 = time.perf_counter()
    status, _ = fetch_shard(rows, cfg, tempfile.gettempdir(), "bench")
    took = time.perf_counter() - t0
    bad = [s for s in status["fetch_status"].to_pylist() if s != "ok"]
    assert not bad, bad[:5]
    return took


def throughput(rows: int, threads: int, rounds: int) -> dict:
    bodies = images(rows)
    with ImageServer("127.0.0.1") as srv:
        urls = [srv.add(f"/{i}.jpg", b) for i, b in enumerate(bodies)]
        run_curate(urls[:20], threads, 10)  # warm imports
        run_img2dataset(urls[:20], threads, 10)
        t_i2d, t_cur = [], []
        for r in range(rounds):
            order = [("i2d", run_img2dataset), ("curate", run_curate)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                (t_i2d if name == "i2d" else t_cur).append(fn(urls, threads, 10))
    i2d, cur = rows / statistics.median(t_i2d), rows / statistics.median(t_cur)
    return {
        "rows": rows, "threads": threads, "rounds": rounds, "mean_jpeg_bytes": int(np.mean([len(b) for b in bodies])),
        "img2dataset_img_s": round(i2d, 1), "curate_img_s": round(cur, 1), "ratio_curate_over_img2dataset": round(cur / i2d, 3),
        "img2dataset_s": [round(t, 2) for t in t_i2d], "curate_s": [round(t, 2) for t in t_cur],
    }  # fmt: skip


_CHILD = r"""
import json, resource, sys, time, pyarrow as pa
from curate.config import FetchConfig
from curate.stages.fetch import fetch_shard
import img2dataset.resizer, cv2, PIL.Image
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
urls = json.loads(sys.argv[1]); threads = int(sys.argv[2])
base = rss_mb()
cfg = FetchConfig(threads=threads, timeout_s=30, deadline_s=120, retries=0, max_bytes=64 << 20, allow_networks=["127.0.0.0/8"], per_domain_concurrency=threads)
t0 = time.time()
status, images = fetch_shard(pa.table({"row": list(range(len(urls))), "url": urls}), cfg, "/tmp", "mem")
print(json.dumps({"base_rss_mb": round(base), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "statuses": status["fetch_status"].value_counts().to_pylist(), "seconds": round(time.time() - t0, 1)}))
"""


def memory(rows: int, threads: int, mb: int = 50) -> dict:
    small = images(1)[0]
    body = small + b"\0" * (mb * 1024 * 1024 - len(small))  # a valid JPEG, then padding: every byte is read
    with ImageServer("127.0.0.1") as srv:
        urls = [srv.add(f"/big{i}.jpg", body) for i in range(rows)]
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(urls), str(threads)], capture_output=True, text=True, timeout=900
        )
    if out.returncode:
        raise SystemExit(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "threads": threads, "body_mb": mb, **res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-rows", type=int, default=24)
    ap.add_argument("--memory-threads", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps({"throughput": throughput(a.rows, a.threads, a.rounds)}, indent=1), flush=True)
    if a.memory:
        print(json.dumps({"memory": memory(a.memory_rows, a.memory_threads)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
