"""CPU paths for the ViT-B-32 image tower, measured in ONE run (results in docs/PERFORMANCE.md):

- fp32 (the plain open_clip model), bf16 weights+inputs (curate's `bf16-image` path),
  torch dynamic int8 (`torch.ao.quantization.quantize_dynamic` on the Linear layers: fbgemm with
  AVX512-VNNI here), each at batch 32 with all threads;
- actor layout: one process with all N threads vs N processes with one thread each (what
  `score.actors` x `score.cpu_threads` chooses), for each path, same work per process, started
  together after warm-up.

  .venv/bin/python benchmarks/bench_cpu_paths.py [--rounds 3]

Ratios only: the host is shared. Random weights (same FLOPs as a trained checkpoint).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

BATCH = 32


def _model():
    import open_clip

    torch.manual_seed(0)
    m, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
    return m.visual.eval()


def _rate(fn, x, rounds: int) -> float:
    with torch.inference_mode():
        fn(x)
        best = min(_timed(fn, x) for _ in range(rounds))
    return x.shape[0] / best


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def _prepared(path: str):
    """(model, input) for a CPU path: fp32, bf16 (weights and input) or int8_dynamic."""
    v = _model()
    x = torch.randn(BATCH, 3, 224, 224)
    if path == "bf16":
        return v.to(torch.bfloat16), x.to(torch.bfloat16)
    if path == "int8_dynamic":
        return torch.ao.quantization.quantize_dynamic(v, {torch.nn.Linear}, dtype=torch.qint8), x
    return v, x


def _worker(path: str, threads: int, batches: int, q, barrier) -> None:
    torch.set_num_threads(threads)
    v, x = _prepared(path)
    with torch.inference_mode():
        v(x)
        barrier.wait()  # every process starts timing together, after its warm-up
        t = time.perf_counter()
        for _ in range(batches):
            v(x)
        q.put(time.perf_counter() - t)


def layout(path: str, procs: int, threads: int, batches: int) -> float:
    """img/s of `procs` processes x `threads` threads, each doing `batches` batches."""
    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(procs)
    ps = [ctx.Process(target=_worker, args=(path, threads, batches, q, barrier)) for _ in range(procs)]
    for p in ps:
        p.start()
    times = [q.get() for _ in range(procs)]
    for p in ps:
        p.join()
    return procs * batches * BATCH / max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    v = _model()
    x = torch.randn(BATCH, 3, 224, 224)
    vb = _model().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    vq = torch.ao.quantization.quantize_dynamic(_model(), {torch.nn.Linear}, dtype=torch.qint8)
    res = {"paths_img_per_s": {}, "cpus": n, "torch": torch.__version__, "loadavg_start": os.getloadavg()[0]}
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(v(x).float(), dim=-1)
        for name in ("fp32", "bf16", "int8_dynamic"):
            res["paths_img_per_s"].setdefault(name, 0.0)
        for _ in range(args.rounds):  # interleaved rounds, best of each
            for name, fn, inp in (("fp32", v, x), ("bf16", vb, xb), ("int8_dynamic", vq, x)):
                r = _rate(fn, inp, 1)
                res["paths_img_per_s"][name] = max(res["paths_img_per_s"][name], r)
        res["cosine_to_fp32"] = {
            "bf16": float((torch.nn.functional.normalize(vb(xb).float(), dim=-1) * ref).sum(-1).min()),
            "int8_dynamic": float((torch.nn.functional.normalize(vq(x).float(), dim=-1) * ref).sum(-1).min()),
        }
    fp = res["paths_img_per_s"]["fp32"]
    res["ratios_vs_fp32"] = {k: v_ / fp for k, v_ in res["paths_img_per_s"].items()}
    if n > 1:  # interleaved: (1 process x n threads, n processes x 1 thread) per path, best of rounds
        lay: dict = {}
        for _ in range(args.rounds):
            for path in ("fp32", "bf16", "int8_dynamic"):
                for procs, threads in ((1, n), (n, 1)):
                    key = f"{path}: {procs} process(es) x {threads} thread(s)"
                    lay[key] = max(lay.get(key, 0.0), layout(path, procs, threads, args.batches))
        res["layout_img_per_s"] = lay
        res["layout_ratios_vs_fp32_one_process"] = {
            k: v_ / lay[f"fp32: 1 process(es) x {n} thread(s)"] for k, v_ in lay.items()
        }
    res["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "cpu_paths.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
