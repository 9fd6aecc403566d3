"""Benchmark: re-selection memory and time against pool size, for each selection engine, on a
local multi-node Ray cluster (`ray start` head + worker nodes on this machine).

    .venv/bin/python benchmarks/bench_select_scale.py [--rows 1000000 3000000] [--workers 2]
        [--engines local ray] [--dir /tmp/curate-scale] [--caption-jaccard 0.8] [--name select_scale]
        [--update-docs]

For each size: a DataComp-format pool (uid, url, text, original_width, original_height, sha256,
clip_l14_similarity_score) with ~10% duplicates (4% repeat another row's URL and caption, 2% its
URL only, 2% its image sha256, 2% are near copies of its caption: upper-cased, or a word added),
run once through `curate run` with caption band keys (annotate.caption_minhash; no fetch, no
model: the scores are the pool's column; cached under --dir), then `curate select RUN
--clip-top-fraction 0.3 --caption-jaccard J` (URL, image sha256 and uid dedup, and caption near
duplicates at Jaccard J, default 0.8; 0 = off) and
`--engine` each engine, as its own process. Measured per selection: wall time, the driver's peak
RSS (VmHWM, which the driver writes at exit through benchmarks/probe/sitecustomize.py; not wait4's
ru_maxrss, which starts from the benchmark process's own high-water mark) and the largest peak RSS
of any Ray worker process
(RssAnon sampled every 0.2 s while the selection runs: a worker's own heap; the object store it
maps is shared and bounded per node by OBJECT_STORE). The question it answers: does the driver's memory
stay flat as the pool grows (issue: the decision layer on Ray with a bounded driver)?

With both engines, their selections of each pool are compared (tests/engine_support.py: files,
uids.npy bytes, counts, report numbers): a difference stops the benchmark.

Prints the CPU flags; writes benchmarks/results/select_scale.{json,md}; --update-docs replaces the
table between the BENCH:select_scale markers in docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_results import publish  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from engine_support import same_selection  # noqa: E402  (files, uids.npy bytes, counts, report numbers)

BIN = Path(sys.executable).parent
SHARD_ROWS = 100_000
OBJECT_STORE = 2 * 2**30  # bytes of object store per worker node


VOCAB = np.array([f"w{i:04d}" for i in range(4096)])
WORDS = 10


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a well-spread 64-bit hash of each value (uint64 arithmetic wraps)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def captions(k: np.ndarray) -> pl.Series:
    """A caption of 10 words for each row number: deterministic, so a copy can be made of any row
    of the pool; two rows share a word at a position with probability 1/4096 (distinct captions)."""
    keys = k.astype(np.uint64)[:, None] * np.uint64(WORDS) + np.arange(WORDS, dtype=np.uint64)[None, :]
    words = VOCAB[(_mix(keys) % np.uint64(len(VOCAB))).astype(np.int64)]
    return pl.DataFrame(words, orient="row").select(pl.concat_str(pl.all(), separator=" ")).to_series()


def make_pool(path: Path, rows: int) -> None:
    """DataComp-format shards of SHARD_ROWS rows with ~10% injected duplicates (once)."""
    if (path / "_complete").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    for s, start in enumerate(range(0, rows, SHARD_ROWS)):
        idx = np.arange(start, min(rows, start + SHARD_ROWS))
        n = len(idx)
        r = rng.random(n)
        other = rng.integers(0, rows, n)
        url_src = np.where(r < 0.06, other, idx)  # 4% URL + caption, 2% URL only
        sha_src = np.where((r >= 0.06) & (r < 0.08), other, idx)  # 2% the same image elsewhere
        near = (r >= 0.08) & (r < 0.10)  # 2% a near copy of another row's caption, elsewhere
        text = captions(np.where((r < 0.04) | near, other, idx))
        text = (
            pl.DataFrame({"t": text, "r": r})
            .select(
                pl.when(pl.col("r").is_between(0.08, 0.09, closed="left"))
                .then(pl.col("t").str.to_uppercase())  # the same shingles: one representative
                .when(pl.col("r").is_between(0.09, 0.10, closed="left"))
                .then(pl.col("t") + " photo")  # Jaccard 9/10 on word pairs: a verified pair
                .otherwise(pl.col("t"))
            )
            .to_series()
        )
        pl.DataFrame(
            {
                "uid": [f"{k:032x}" for k in idx],
                "url": [f"https://img{k % 20011}.example.com/p/{k}.jpg" for k in url_src],
                "text": text,
                "original_width": rng.integers(64, 1600, n),
                "original_height": rng.integers(64, 1600, n),
                "sha256": [f"{k:064x}" for k in sha_src],
                "clip_l14_similarity_score": rng.normal(0.25, 0.06, n).astype(np.float32),
            }
        ).write_parquet(path / f"{s:08d}.parquet")
    (path / "_complete").write_text("")


def make_run(pool: Path, run: Path, env: dict) -> None:
    if (run / "manifest.json").exists() and json.loads((run / "manifest.json").read_text()).get("state") == "complete":
        return
    spec = run.parent / f"{run.name}.toml"
    spec.write_text(
        f'name = "scale"\n[input]\npaths = ["{pool}/"]\nlayout = "datacomp"\n[output]\ndir = "{run}"\n'
        '[fetch]\nenabled = false\n[score]\nsource = "column"\ncolumn = "clip_l14_similarity_score"\n'
        "[annotate]\ncaption_minhash = true\n"
        "[selection]\nclip = { top_fraction = 0.3 }\n"
    )
    subprocess.run([str(BIN / "curate"), "run", str(spec)], check=True, env=env, capture_output=True)
    # no fetch here, so no image_sha256 (the hash of the bytes served): give each row the one a
    # fetch would record, the pool's own sha256, so that the image dedup has its 2% to find
    for p in sorted((run / "annotations").glob("*.parquet")):
        tmp = p.with_suffix(".tmp")
        pl.read_parquet(p).with_columns(pl.col("sha256").alias("image_sha256")).write_parquet(tmp)
        tmp.replace(p)


def _workers() -> list[str]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"default_worker.py" in cmd or cmd.startswith(b"ray::"):
            pids.append(pid)
    return pids


def _status(pid: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerMemory(threading.Thread):
    """Samples every Ray worker's private memory (RssAnon: its own heap, not the object store's
    shared pages it maps, which VmHWM also counts) while a selection runs; `peak` is the largest.
    With `driver` (a pid), also that process's private and file-backed resident memory."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0, threading.Event()
        self.driver: str | None = None
        self.driver_anon = self.driver_file = 0

    def run(self) -> None:
        while not self.done.is_set():
            for pid in _workers():
                self.peak = max(self.peak, _status(pid, "RssAnon"))
            if self.driver:
                self.driver_anon = max(self.driver_anon, _status(self.driver, "RssAnon"))
                self.driver_file = max(self.driver_file, _status(self.driver, "RssFile"))
            self.done.wait(self.every)


def select(run: Path, engine: str, env: dict, caption_jaccard: float) -> dict:
    peak_file = run.parent / f"peak-{engine}.kb"
    peak_file.unlink(missing_ok=True)
    # the driver writes its own peak (VmHWM) at exit: benchmarks/probe/sitecustomize.py says why
    env = {**env, "PYTHONPATH": str(ROOT / "benchmarks" / "probe"), "CURATE_BENCH_PEAK": str(peak_file)}
    watch = WorkerMemory()
    watch.start()
    t = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "curate"), "select", str(run), "--name", f"scale-{engine}", "--engine", engine,
         "--clip-top-fraction", "0.3", "--caption-jaccard", str(caption_jaccard)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    watch.driver = str(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    watch.done.set()
    watch.join()
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"curate select --engine {engine} failed:\n{out}\n{err[-3000:]}")
    out_dir = run / "selections" / f"scale-{engine}"
    summary = json.loads((out_dir / "selection.json").read_text())
    reasons = pl.scan_parquet(out_dir / "removed" / "*.parquet").group_by("reason").len().collect()
    return {
        "removed_by_reason": dict(sorted(zip(reasons["reason"], reasons["len"]))),
        "wall_s": wall,
        "driver_peak_rss": int(peak_file.read_text()) * 1024,  # VmHWM of the driver's own memory map
        "driver_maxrss_wait4": usage.ru_maxrss * 1024,  # counts the benchmark's own memory: see probe/
        "driver_peak_private": watch.driver_anon,  # RssAnon, sampled: its own heap
        "driver_peak_file": watch.driver_file,  # RssFile, sampled: file pages it maps (page cache)
        "worker_peak_private": watch.peak,
        "timings": summary.get("timings", {}),  # seconds per step, as the selection recorded them
    }


def start_cluster(workers: int, tmp: str) -> tuple[str, dict]:
    # token authentication off for this throwaway loopback cluster (as the cluster tests run theirs)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "CURATE_PROGRESS": "0"}
    port = 6390
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
         f"--temp-dir={tmp}"], check=True, env=env, capture_output=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    for _ in range(workers):
        subprocess.run(
            # a bounded object store per node: what does not fit spills to disk, as on a real node
            [
                str(BIN / "ray"),
                "start",
                f"--address={address}",
                "--num-cpus=1",
                f"--object-store-memory={OBJECT_STORE}",
            ],
            check=True,
            env=env,
            capture_output=True,
        )
    return address, env


def stop_cluster(env: dict) -> None:
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def cpu_flags() -> list[str]:
    """The flags of interest this host has (curate.model reads /proc/cpuinfo)."""
    from curate.model import cpu_flags as host_flags  # imports torch: a second, once

    have = host_flags()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]


def table(res: dict) -> str:
    c = res["conditions"]
    lines = [
        "DataComp-format pools with ~10% duplicates (2% near-duplicate captions); `curate select --clip-top-fraction "
        f"0.3 --caption-jaccard {c['caption_jaccard']:g}` (URL, image sha256 and uid dedup; caption near-duplicates "
        f"{'at that Jaccard' if c['caption_jaccard'] else 'off'}); {c['cpus']} cores, "
        f"CPU flags: {' '.join(c['cpu_flags']) or 'none listed'}; local Ray cluster: a head with 0 CPUs and "
        f"{c['workers']} worker node(s) of 1 CPU on this machine.",
        "",
        "| rows | engine | wall s | µs per row | driver peak RSS | largest worker peak (private) | steps (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    same = sorted({r["rows"] for r in res["rows"] if r.get("identical_to_local")})
    if same:
        lines[0] += (
            " Both engines wrote identical selections (files, uids.npy bytes, counts, report numbers) at "
            + ", ".join(f"{n:,}" for n in same)
            + " rows."
        )
    if c.get("local_max_rows"):
        lines[0] += f" The local engine was run on pools up to {c['local_max_rows']:,} rows only."
    for r in res["rows"]:
        steps = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in r.get("timings", {}).items())
        lines.append(
            f"| {r['rows']:,} | {r['engine']} | {r['wall_s']:.1f} | {r['wall_s'] / r['rows'] * 1e6:.1f} | "
            f"{r['driver_peak_rss'] / 2**30:.2f} GiB | {r['worker_peak_private'] / 2**30:.2f} GiB | {steps} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/curate-scale")
    ap.add_argument(
        "--caption-jaccard", type=float, default=0.8, help="caption near-dedup threshold of the selections (0 = off)"
    )
    ap.add_argument(
        "--local-max-rows", type=int, default=0, help="run the local engine only on pools up to this size (0 = all)"
    )
    ap.add_argument("--name", default="select_scale", help="results/<name>.{json,md} and the docs' BENCH markers")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    print(f"CPU flags: {' '.join(cpu_flags())}; {os.cpu_count()} cores", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:
        address, env = start_cluster(args.workers, ray_tmp)
        try:
            for n in args.rows:
                pool, run = base / f"pool-{n}", base / f"run-{n}"
                make_pool(pool, n)
                make_run(pool, run, {**env, "RAY_ADDRESS": address})
                engines = [
                    e for e in args.engines if e != "local" or not args.local_max_rows or n <= args.local_max_rows
                ]
                for engine in engines:
                    env_e = {**env, "RAY_ADDRESS": address} if engine != "local" else env
                    r = {"rows": n, "engine": engine, **select(run, engine, env_e, args.caption_jaccard)}
                    print(json.dumps(r), flush=True)
                    results.append(r)
                if {"local", "ray"} <= set(engines):  # the engines' selections, compared
                    same_selection(run / "selections" / "scale-local", run / "selections" / "scale-ray")
                    results[-1]["identical_to_local"] = True
                    print(f"{n:,} rows: the engines' selections are identical", flush=True)
        finally:
            stop_cluster(env)
    res = {
        "conditions": {
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "workers": args.workers,
            "caption_jaccard": args.caption_jaccard,
            "local_max_rows": args.local_max_rows,
        },
        "rows": results,
    }
    publish(args.name, res, table(res), "SCALE.md" if args.update_docs else None)


if __name__ == "__main__":
    main()
