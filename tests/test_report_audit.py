"""Acceptance checks for the audit report: synthetic groups with injected removal rates (exact
rates, Wilson coverage, flags with a bounded false-flag rate), per-group reconciliation, and the
HTML rendered in real headless Chromium (no console errors, key numbers visible, screenshot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.reports.groups import read_table, table_files
from curate.reports.summary import build_report
from curate.filters.rules import RULE_ORDER

REASONS = [r.value for r in RULE_ORDER]
BASE = 0.20
# (size, injected removal probability); the deviations balance (sum of size * (p - BASE) = 0), so
# the "rest" of any null group has the base rate in expectation and the null groups are truly null.
GROUPS = {
    "g100k": (100_000, BASE), "g40k": (40_000, BASE), "g20k": (20_000, BASE), "g10k": (10_000, BASE),
    "g5k": (5_000, 0.05), "g2k": (2_000, 0.45), "g1k": (1_000, BASE), "g500": (500, 0.60),
    "g200": (200, 0.45), "g50": (50, BASE),
}  # fmt: skip
DIFFERENT = {g for g, (_, p) in GROUPS.items() if p != BASE}


def synthetic(seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    names = np.repeat(np.array(list(GROUPS)), [n for n, _ in GROUPS.values()])
    p = np.repeat(np.array([q for _, q in GROUPS.values()]), [n for n, _ in GROUPS.values()])
    n = len(names)
    removed = rng.random(n) < p
    # reasons of removed rows: each rule fails with its own probability, at least one
    p_fail = {
        "missing_url": 0.01,
        "language": 0.3,
        "caption_length": 0.1,
        "fetch_failed": 0.1,
        "opt_out": 0.02,
        "image_size": 0.05,
        "not_scored": 0.02,
        "clip_score": 0.5,
        "duplicate_url": 0.1,
        "duplicate_image": 0.05,
        "duplicate_caption_exact": 0.03,
        "duplicate_caption": 0.05,
        "duplicate_image_near": 0.05,
        "duplicate_uid": 0.01,
    }
    # one probability per RULE_ORDER entry (KeyError if one is new)
    fail = rng.random((n, len(REASONS))) < np.array([p_fail[r] for r in REASONS])
    none = removed & ~fail.any(axis=1)
    fail[none, rng.integers(0, len(REASONS), none.sum())] = True
    fail &= removed[:, None]
    first = np.where(removed, np.argmax(fail, axis=1), -1)
    reason = pl.Series("reason", np.array(REASONS + [None], dtype=object)[first].tolist(), dtype=pl.String)
    reasons = pl.DataFrame({r: fail[:, i] for i, r in enumerate(REASONS)}).select(
        pl.concat_list([pl.when(pl.col(r)).then(pl.lit(r)) for r in REASONS]).list.drop_nulls().alias("reasons")
    )["reasons"]
    return pl.DataFrame(
        {
            "shard": "s",
            "row": np.arange(n),
            "kept": ~removed,
            "reason": reason,
            "reasons": reasons,
            "domain": names,
            "tld": "com",
            "language": np.where(np.arange(n) % 2 == 0, "en", "pl"),
            "clip_score": rng.normal(0.3, 0.05, n).astype(np.float32),
        }
    )


@pytest.fixture(scope="module")
def runs():
    out = []
    for seed in range(8):
        df = synthetic(seed)
        out.append((df, build_report(df.lazy(), min_group_size=30, top_groups=25)))
    return out


def test_rates_exact_and_groups_reconcile(runs):
    df, rep = runs[0]
    exp = df.group_by("domain").agg(pl.len().alias("n"), (~pl.col("kept")).sum().alias("removed"))
    exp = {r["domain"]: r for r in exp.iter_rows(named=True)}
    for c in ("domain", "language"):
        for g in rep["groups"][c]["rows"]:
            assert g["kept"] + sum(g["removed_by_reason"].values()) == g["rows_in"]  # exactly
            assert g["removal_rate"] == g["removed"] / g["rows_in"]
    for g in rep["groups"]["domain"]["rows"]:
        assert g["rows_in"] == exp[g["value"]]["n"] and g["removed"] == exp[g["value"]]["removed"]
        assert g["removal_rate"] == exp[g["value"]]["removed"] / exp[g["value"]]["n"]
        for r in REASONS:  # marginal effect and only-this-rule counts
            sub = df.filter(pl.col("domain") == g["value"])
            assert g["failed_any"][r] == sub["reasons"].list.contains(r).sum()
            assert (
                g["removed_only"][r]
                == sub.filter(pl.col("reasons").list.len() == 1)["reasons"].list.first().eq(r).sum()
            )
    assert rep["reconciles"]


def test_coverage_flags_and_false_flags(runs):
    covered = total = flagged_diff = n_diff = false_flags = n_null = 0
    for _, rep in runs:
        rows = {g["value"]: g for g in rep["groups"]["domain"]["rows"]}
        assert set(rows) == set(GROUPS)  # nothing dropped
        for name, (_, p) in GROUPS.items():
            g = rows[name]
            lo, hi = g["ci95"]
            covered += lo <= p <= hi
            total += 1
            if name in DIFFERENT:
                n_diff += 1
                flagged_diff += g["significant"]
                if g["significant"]:
                    assert g["direction"] == ("higher" if p > BASE else "lower")
            else:
                n_null += 1
                false_flags += g["significant"]
    print(f"coverage {covered}/{total}, power {flagged_diff}/{n_diff}, false flags {false_flags}/{n_null}")
    assert covered / total >= 0.90
    assert flagged_diff == n_diff  # every injected difference is found
    assert false_flags / n_null <= 0.10


def test_too_small_is_shown_never_tested():
    df = synthetic(0)
    rep = build_report(df.lazy(), min_group_size=100)
    g50 = next(g for g in rep["groups"]["domain"]["rows"] if g["value"] == "g50")
    assert g50["too_small"] and g50["p_value"] is None and g50["significant"] is False


# --------------------------------------------------------------------------------------------------
# the HTML in a real browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def chromium():
    from chromium_cdp import find_chromium

    b = find_chromium()
    if not b:
        pytest.fail("chromium is missing: `make test` installs it (apt-get install chromium)")
    return b


def _audit_run_dir(tmp: Path) -> Path:
    """A small run directory with annotations, cached images and a manifest, selected for real."""
    import io as _io
    import json

    from PIL import Image

    from curate.presets import preset_path
    from curate.config import load_spec
    from curate.selection import write_selection

    run = tmp / "run"
    (run / "annotations").mkdir(parents=True)
    (run / "images").mkdir()
    sys_path = Path(__file__).parent
    import sys

    sys.path.insert(0, str(sys_path))
    from test_report_sweep import synthetic_annotations

    ann = synthetic_annotations(3000, seed=5).collect().with_columns(pl.col("shard").alias("shard"))
    for (shard,), part in ann.partition_by("shard", as_dict=True).items():
        pq_path = run / "annotations" / f"{shard}.parquet"
        part.write_parquet(pq_path)
        (run / "annotations" / f"{shard}.done").write_text("{}")
        imgs = []
        for r in part.filter(pl.col("fetch_status") == "ok")["row"].to_list()[:400]:
            buf = _io.BytesIO()
            Image.new("RGB", (64, 48), ((r * 37) % 255, (r * 91) % 255, 120)).save(buf, format="JPEG")
            imgs.append({"row": r, "jpg": buf.getvalue()})
        pl.DataFrame(imgs, schema={"row": pl.Int64, "jpg": pl.Binary}).write_parquet(
            run / "images" / f"{shard}.parquet"
        )
    spec = load_spec(preset_path("laion_sample"))
    m = {
        "format": 1,
        "spec": json.loads(spec.model_dump_json()),
        "state": "done",
        "model": {"model_id": "test"},
    }  # a curate manifest
    (run / "manifest.json").write_text(json.dumps(m))
    from curate.config import SelectionConfig

    sel = SelectionConfig(language={"allow": ["en", "de", "pl"]}, caption={"min_words": 2}, clip={"min_score": 0.3})
    write_selection(str(run), sel, spec.report)
    return run


def test_html_in_headless_chromium(chromium, tmp_path):
    from chromium_cdp import load_page
    import json

    run = _audit_run_dir(tmp_path)
    sel = run / "selections" / "default"
    rep = json.loads((sel / "report.json").read_text())
    assert rep["sweep"]["thresholds"] and rep["gallery"]["groups"]
    assert any(p["has_image"] for g in rep["gallery"]["groups"] for p in g["above"] + g["below"])
    tables = {p.stem for p in (sel / "tables").glob("*.parquet")}
    assert {"sweep", "reasons", "gallery", "flips_language"} <= tables
    for c in ("domain", "language"):  # the full group tables, in parts (one here: the local engine)
        (part,) = table_files(str(sel / "tables"), f"groups_{c}")
        assert read_table(str(sel / "tables"), f"groups_{c}")["rows_in"].sum() == rep["totals"]["rows_in"]
        assert Path(part).name.startswith(f"groups_{c}.") and Path(part).name.endswith(".part-00000-of-00001.parquet")
    res = load_page(sel / "report.html")
    assert res.errors == [], res.errors
    t = rep["totals"]
    for needle in (
        f"{t['rows_in']:,}",
        f"{t['kept']:,}",
        f"{100 * t['removal_rate']:.1f}%",
        "Disparities",
        "Threshold sweep",
        "Boundary gallery",
        "CLIP score distribution per group",
    ):
        assert needle in res.text, needle
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(res.png)
    assert res.png[:8] == b"\x89PNG\r\n\x1a\n" and len(res.png) > 10_000


def test_console_error_capture_really_fails(chromium, tmp_path):
    from chromium_cdp import load_page

    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('injected'); null.boom();</script>")
    res = load_page(bad, screenshot=False)
    assert any("injected" in e for e in res.errors) and any("exception" in e for e in res.errors)


def test_gallery_rows_read_by_tasks_on_ray_match_the_local_engine(ray_session, tmp_path):
    """The Ray engine reads the gallery's captions, URLs and thumbnails with a task per shard
    (reports/gallery_rows.py): the same rows, captions and images as the local engine's reads."""
    import json

    from curate.config import SelectionConfig
    from curate.selection import write_selection

    from curate.accounting import annotation_counts

    run = _audit_run_dir(tmp_path)
    for done in (run / "annotations").glob("*.done"):  # the full markers the Ray engine plans blocks from
        own = annotation_counts(pl.read_parquet(done.with_suffix(".parquet")))
        marker = {"shard": done.stem, **own, "rows_read": own["rows"], "finished_at": "2026-01-01T00:00:00Z"}
        done.write_text(json.dumps(marker))
    rules = {"language": {"allow": ["en", "de", "pl"]}, "caption": {"min_words": 2}, "clip": {"min_score": 0.3}}
    write_selection(str(run), SelectionConfig(name="on-ray", engine="ray", block_rows=1000, **rules))
    local = json.loads((run / "selections" / "default" / "report.json").read_text())["gallery"]
    ray_ = json.loads((run / "selections" / "on-ray" / "report.json").read_text())["gallery"]
    assert ray_ == local
    picked = [p for g in ray_["groups"] for p in g["above"] + g["below"]]
    assert any(p["has_image"] for p in picked) and all(p["caption"] is not None for p in picked)
    html = (run / "selections" / "on-ray" / "report.html").read_text()
    shown = [p for p in picked if p["has_image"]]
    assert html.count("data:image/jpeg;base64,") >= len(shown) > 0  # the thumbnails reached the page
