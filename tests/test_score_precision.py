"""Precision guard: every reduced-precision scoring path that "auto" can pick is checked against
fp32 on the bundled checkpoint, on real LAION captions (paired with synthetic images) and on
demo-like matched/mismatched synthetic pairs:

- |delta clip_score| <= 0.01 for at least 99.9% of pairs, and
- the kept/removed decision at the demo threshold (pipelines/demo.toml, clip.min_score) flips for
  at most 0.5% of pairs.

Also: "auto" resolves to the path the CPU supports, and LoadedClip.precision names it (the run
manifest records it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.demo import synthetic as S
from curate.config import ScoreConfig
from curate.model import cpu_has_native_bf16, resolve_precision
from curate.stages.score import ClipScorer

ROOT = Path(__file__).resolve().parents[1]
LAION = Path(__file__).resolve().parent.parent / "data" / "laion-sample" / "laion_10000.parquet"
N_LAION = 1500
N_DEMO = 1500
DEMO_THRESHOLD = tomllib.loads((ROOT / "pipelines" / "demo.toml").read_text())["selection"]["clip"]["min_score"]
REDUCED = ["bf16-image"]  # every CPU path other than fp32 that precision="auto" may choose


def _laion_captions(n: int) -> list[str]:
    import polars as pl

    caps = pl.read_parquet(LAION, columns=["TEXT"])["TEXT"].drop_nulls().to_list()  # shipped in data/
    caps = [c for c in caps if c.strip()]
    return caps[:n]


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(20_250_707)
    images, captions, kind = [], [], []
    for cap in _laion_captions(N_LAION):
        a = S.random_attrs(rng)
        images.append(S.to_jpeg(S.render(a, rng, int(rng.integers(64, 200)), int(rng.integers(64, 200)))))
        captions.append(cap)
        kind.append("laion")
    for i in range(N_DEMO):  # as curate/demo/data.py draws them: 64-200 px, ~30% mismatched
        a = S.random_attrs(rng)
        shown = a if rng.random() >= 0.3 else S.mismatched_attrs(a, rng)
        images.append(S.to_jpeg(S.render(a, rng, int(rng.integers(64, 200)), int(rng.integers(64, 200)))))
        captions.append(S.caption(shown, S.LANGUAGES[i % len(S.LANGUAGES)], rng))
        kind.append("demo")
    return images, captions, np.array(kind)


@pytest.fixture(scope="module")
def fp32_scores(pairs):
    torch.set_num_threads(2)
    images, captions, _ = pairs
    return ClipScorer(ScoreConfig(precision="fp32", batch_size=64)).score(images, captions)


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_precision_guard(precision, pairs, fp32_scores):
    images, captions, kind = pairs
    scorer = ClipScorer(ScoreConfig(precision=precision, batch_size=64), device="cpu")
    assert scorer.clip.precision == precision
    got = scorer.score(images, captions)
    assert np.isfinite(fp32_scores).all() and np.isfinite(got).all()
    delta = np.abs(got.astype(np.float64) - fp32_scores)
    within = float((delta <= 0.01).mean())
    flips = (got >= DEMO_THRESHOLD) != (fp32_scores >= DEMO_THRESHOLD)
    demo = kind == "demo"
    near = np.abs(fp32_scores[demo] - DEMO_THRESHOLD) <= 0.05
    print(
        f"\n{precision}: max |d| {delta.max():.4f}, p99.9 {np.quantile(delta, 0.999):.4f}, "
        f"within 0.01: {within:.4%}; laion max |d| {delta[~demo].max():.4f}; demo max |d| {delta[demo].max():.4f}; "
        f"flips at {DEMO_THRESHOLD}: {int(flips.sum())}/{len(flips)} (demo pairs within 0.05 of it: {int(near.sum())})"
    )
    assert within >= 0.999, within
    assert flips.mean() <= 0.005, int(flips.sum())
    # the demo pairs really straddle the threshold (the guard is not vacuous)
    assert (fp32_scores[demo] >= DEMO_THRESHOLD).mean() > 0.3 and (fp32_scores[demo] < DEMO_THRESHOLD).mean() > 0.2


def test_auto_picks_bf16_only_on_native_bf16_cpus(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("CURATE_CPU_BF16", "1")
    assert resolve_precision("auto", cpu) == "bf16-image"
    monkeypatch.setenv("CURATE_CPU_BF16", "0")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("fp32", cpu) == "fp32"


def test_the_path_auto_took_is_named_on_the_loaded_model():
    scorer = ClipScorer(ScoreConfig(precision="auto"), device="cpu")
    assert scorer.clip.precision == ("bf16-image" if cpu_has_native_bf16() else "fp32")
    assert scorer.clip.precision in REDUCED + ["fp32"]
