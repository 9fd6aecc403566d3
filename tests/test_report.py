"""The selection report: every number checked against counts recomputed here with numpy."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.reports.html import render_html
from curate.reports.summary import UNKNOWN, build_report, wilson_interval, write_report
from curate.filters.rules import REASON_HELP, RULE_ORDER

REASONS = [r.value for r in RULE_ORDER]
HOSTILE = "<script>alert(1)</script>"

# domain -> (rows, removal probability); one below min_group_size (30), one null domain
DOMAINS: dict[str | None, tuple[int, float]] = {
    "big.com": (2000, 0.10),
    "news.co.uk": (1200, 0.25),
    "shop.de": (800, 0.40),
    "blog.fr": (600, 0.15),
    "pics.jp": (500, 0.60),
    "wiki.org": (400, 0.05),
    "forum.br": (250, 0.30),
    "cdn.in": (150, 0.50),
    "tiny.ru": (80, 0.20),
    HOSTILE: (12, 0.50),
    None: (40, 0.35),
}
LANGS = ["en", "de", "ja", None]
STATUSES = ["ok", "download_failed", "decode_failed", "not_attempted"]


def make_decisions(seed: int = 7) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    domains: list[str | None] = []
    probs: list[float] = []
    for d, (n, p) in DOMAINS.items():
        domains += [d] * n
        probs += [p] * n
    n = len(domains)
    order = rng.permutation(n)
    domains = [domains[i] for i in order]
    p = np.asarray(probs)[order]
    kept = rng.random(n) >= p
    reasons: list[list[str]] = []
    first: list[str | None] = []
    for k in kept:
        if k:
            reasons.append([])
            first.append(None)
        else:
            mask = rng.random(len(REASONS)) < 0.3
            if not mask.any():
                mask[rng.integers(len(REASONS))] = True
            rs = [r for r, m in zip(REASONS, mask) if m]
            reasons.append(rs)
            first.append(rs[0])
    scores = rng.normal(0.28, 0.05, n).astype(np.float32)
    score_null = rng.random(n) < 0.05
    tlds = [None if d is None else d.rsplit(".", 1)[-1] if "." in d else "x" for d in domains]
    return pl.DataFrame(
        {
            "shard": [f"part-{i % 3:05d}" for i in range(n)],
            "row": pl.Series(np.arange(n) // 3, dtype=pl.Int64),
            "uid": [f"{i:032x}" for i in range(n)],
            "kept": kept,
            "reason": first,
            "reasons": pl.Series(reasons, dtype=pl.List(pl.String)),
            "clip_score": pl.Series([None if z else float(s) for s, z in zip(scores, score_null)], dtype=pl.Float32),
            "domain": domains,
            "tld": tlds,
            "language": [LANGS[i] for i in rng.integers(0, len(LANGS), n)],
            "fetch_status": [STATUSES[i] for i in rng.integers(0, len(STATUSES), n)],
            "source": [f"src{i}" for i in rng.integers(0, 3, n)],
        }
    )


@pytest.fixture(scope="module")
def df() -> pl.DataFrame:
    return make_decisions()


@pytest.fixture(scope="module")
def report(df: pl.DataFrame) -> dict:
    return build_report(
        df.lazy(),
        extra_group_columns=("source",),
        min_group_size=30,
        top_groups=100,
        meta={
            "selection": "sel-a",
            "thresholds": {"clip_min": 0.28},
            "model": "curate-tiny/bundled",
            "run_dir": "runs/test",
            "created_at": "2025-01-01T00:00:00Z",
        },
    )


def _np(df: pl.DataFrame, col: str) -> np.ndarray:
    return np.asarray(df[col].to_list(), dtype=object)


def _counts(kept: np.ndarray, reason: np.ndarray, mask: np.ndarray) -> dict:
    k = kept[mask]
    r = reason[mask]
    return {
        "rows_in": int(mask.sum()),
        "kept": int((k == True).sum()),  # noqa: E712
        "removed": int((k == False).sum()),  # noqa: E712
        "by_reason": {x: int(((k == False) & (r == x)).sum()) for x in REASONS},  # noqa: E712
    }


# --------------------------------------------------------------------------------------------------


def test_totals_and_reasons_exact(df, report):
    kept = _np(df, "kept")
    reason = _np(df, "reason")
    n = len(kept)
    c = _counts(kept, reason, np.ones(n, bool))
    t = report["totals"]
    assert (t["rows_in"], t["kept"], t["removed"]) == (c["rows_in"], c["kept"], c["removed"])
    assert t["removal_rate"] == c["removed"] / c["rows_in"]
    assert [r["reason"] for r in report["reasons"]] == REASONS  # every rule, in order, zeros included
    lists = df["reasons"].to_list()
    for r in report["reasons"]:
        name = r["reason"]
        assert r["removed_first"] == c["by_reason"][name]
        assert r["removed_first_share"] == c["by_reason"][name] / n
        fa = sum(name in x for x in lists)
        assert r["failed_any"] == fa and r["failed_any_share"] == fa / n
        assert r["help"] == REASON_HELP[RULE_ORDER[REASONS.index(name)]]
    assert t["kept"] + sum(r["removed_first"] for r in report["reasons"]) == t["rows_in"]
    assert report["reconciles"] is True and report["problems"] == []
    json.dumps(report, allow_nan=False)  # strict JSON


def test_shards_reconcile(df, report):
    kept, reason, shard = _np(df, "kept"), _np(df, "reason"), _np(df, "shard")
    assert [s["shard"] for s in report["shards"]] == ["part-00000", "part-00001", "part-00002"]
    for s in report["shards"]:
        c = _counts(kept, reason, shard == s["shard"])
        assert (s["rows_in"], s["kept"], s["removed"]) == (c["rows_in"], c["kept"], c["removed"])
        assert s["removed_by_reason"] == c["by_reason"]
        assert s["kept"] + sum(s["removed_by_reason"].values()) == s["rows_in"]
        assert s["reconciles"] is True


@pytest.mark.parametrize("column", ["domain", "tld", "language", "source"])
def test_groups_exact(df, report, column):
    kept, reason = _np(df, "kept"), _np(df, "reason")
    vals = _np(df, column)
    sec = report["groups"][column]
    expected_values = {UNKNOWN if v is None else v for v in vals}
    assert sec["distinct"] == len(expected_values)
    assert {g["value"] for g in sec["rows"]} == expected_values  # nothing dropped, nulls shown
    sizes = [g["rows_in"] for g in sec["rows"]]
    assert sizes == sorted(sizes, reverse=True)
    overall = report["totals"]["removal_rate"]
    for g in sec["rows"]:
        mask = np.array([v is None for v in vals]) if g["unknown"] else (vals == g["value"])
        c = _counts(kept, reason, mask)
        assert (g["rows_in"], g["kept"], g["removed"]) == (c["rows_in"], c["kept"], c["removed"])
        assert g["removed_by_reason"] == c["by_reason"]
        assert g["kept"] + sum(g["removed_by_reason"].values()) == g["rows_in"]
        assert g["removal_rate"] == c["removed"] / c["rows_in"]
        assert g["ratio_to_overall"] == pytest.approx((c["removed"] / c["rows_in"]) / overall, rel=1e-12)
        assert g["ci95"] == wilson_interval(c["removed"], c["rows_in"])
        assert g["ci95"][0] <= g["removal_rate"] <= g["ci95"][1]
        assert g["too_small"] == (c["rows_in"] < 30)
        assert g["reconciles"] is True
    assert sum(sizes) == report["totals"]["rows_in"]


def test_too_small_present_and_flagged(report):
    rows = {g["value"]: g for g in report["groups"]["domain"]["rows"]}
    assert rows[HOSTILE]["rows_in"] == 12 and rows[HOSTILE]["too_small"] is True
    assert rows[UNKNOWN]["rows_in"] == 40 and rows[UNKNOWN]["too_small"] is False and rows[UNKNOWN]["unknown"]
    assert sum(g["too_small"] for g in rows.values()) == report["groups"]["domain"]["too_small_groups"] == 1


def test_top_groups_rollup(df):
    rep = build_report(df, top_groups=3)
    sec = rep["groups"]["domain"]
    rows = [g for g in sec["rows"] if not g["other_groups"]]
    # the largest 3, plus every flagged group outside them (never hidden in the rollup)
    assert [g["value"] for g in rows[:3]] == ["big.com", "news.co.uk", "shop.de"]
    assert all(g["significant"] for g in rows[3:]) and len(rows) == sec["shown"] > 3
    assert sec["distinct"] == 11
    other = sec["rows"][-1]
    n_other = 11 - sec["shown"]
    assert other["value"] == f"(other {n_other} groups)" and other["other_groups"] == n_other
    assert not any(g["significant"] for g in sec["rows"][-1:])
    for k in ("rows_in", "kept", "removed"):
        assert sum(g[k] for g in sec["rows"]) == rep["totals"][k]
    for r in REASONS:
        assert sum(g["removed_by_reason"][r] for g in sec["rows"]) == next(
            x["removed_first"] for x in rep["reasons"] if x["reason"] == r
        )
        assert sum(g["failed_any"][r] for g in sec["rows"]) == next(
            x["failed_any"] for x in rep["reasons"] if x["reason"] == r
        )
    assert other["removal_rate"] == other["removed"] / other["rows_in"]
    assert other["kept"] + sum(other["removed_by_reason"].values()) == other["rows_in"]
    # language has 4 groups, none flagged: top_groups=3 rolls up exactly one
    lang = rep["groups"]["language"]["rows"]
    assert lang[-1]["value"] == "(other 1 groups)" and sum(g["rows_in"] for g in lang) == rep["totals"]["rows_in"]
    assert rep["reconciles"] is True


def test_wilson_hand_computed():
    lo, hi = wilson_interval(10, 100)
    assert round(lo, 4) == 0.0552 and round(hi, 4) == 0.1744
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 1.0


def test_removed_without_reason_is_detected(df):
    # one removed row in part-00001 loses its reason: must be reported, not hidden
    idx = next(
        i
        for i, (k, s, d) in enumerate(zip(df["kept"], df["shard"], df["domain"]))
        if not k and s == "part-00001" and d == "shop.de"
    )
    bad = df.with_columns(pl.when(pl.int_range(pl.len()) == idx).then(None).otherwise(pl.col("reason")).alias("reason"))
    rep = build_report(bad.lazy())
    assert rep["reconciles"] is False
    assert rep["totals"]["reconciles"] is False
    assert rep["anomalies"]["removed_without_reason"] == 1
    shards = {s["shard"]: s for s in rep["shards"]}
    assert shards["part-00001"]["reconciles"] is False and shards["part-00001"]["removed_unexplained"] == 1
    assert shards["part-00000"]["reconciles"] and shards["part-00002"]["reconciles"]
    assert any("part-00001" in p for p in rep["problems"])
    assert any("no reason" in p for p in rep["problems"])
    for sec in rep["groups"].values():
        assert sec["reconciles"] is False
    # counts are still the honest counts: removed includes the broken row
    assert rep["totals"]["removed"] == int((~df["kept"]).sum())
    page = render_html(rep)
    assert "DO NOT RECONCILE" in page and "part-00001" in page
    # the broken row's group is hidden in a rollup: the rollup row must say so
    rep = build_report(bad.lazy(), group_columns=("domain",), top_groups=1)
    rows = rep["groups"]["domain"]["rows"]
    assert sum(g["removed_unexplained"] for g in rows) == 1
    assert [g["reconciles"] for g in rows[:-1]] == [True] * (len(rows) - 1)
    assert rows[-1]["reconciles"] is False and rows[-1]["other_groups"] == 11 - (len(rows) - 1)
    assert rep["groups"]["domain"]["reconciles"] is False


def test_other_anomalies_detected(df):
    n = df.height
    bad = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("kept")).alias("kept"),
        pl.when((pl.int_range(pl.len()) == n - 1) & ~pl.col("kept"))
        .then(pl.lit("made_up_rule"))
        .otherwise(pl.col("reason"))
        .alias("reason"),
    )
    bad = bad.with_columns(  # a kept row with a reason
        pl.when(pl.int_range(pl.len()) == pl.arg_where(pl.col("kept")).first())
        .then(pl.lit("language"))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )
    rep = build_report(bad)
    assert rep["reconciles"] is False
    assert rep["anomalies"]["kept_null"] == 1
    assert rep["anomalies"]["kept_with_reason"] == 1
    if not df["kept"][n - 1]:
        assert rep["anomalies"]["removed_unknown_reason"] == {"made_up_rule": 1}
    assert rep["totals"]["kept"] + rep["totals"]["removed"] == rep["totals"]["rows_in"] - 1


def test_clip_score_section(df, report):
    s = np.array([x for x in df["clip_score"].to_list() if x is not None], dtype=np.float64)
    c = report["clip_score"]
    assert c["scored"] == len(s) and c["null"] == df.height - len(s)
    assert sum(c["histogram"]["counts"]) == len(s)
    edges = c["histogram"]["edges"]
    assert len(edges) == len(c["histogram"]["counts"]) + 1 == 21
    assert edges[0] == pytest.approx(s.min()) and edges[-1] == pytest.approx(s.max())
    expected_hist, _ = np.histogram(s, bins=np.asarray(edges))
    assert list(expected_hist) == c["histogram"]["counts"]
    for k, q in {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}.items():
        assert c["quantiles"][k] == pytest.approx(float(np.quantile(s, q)), abs=1e-6)


def test_clip_all_null_and_constant():
    base = make_decisions().head(50)
    rep = build_report(base.with_columns(pl.lit(None, dtype=pl.Float32).alias("clip_score")))
    assert rep["clip_score"]["scored"] == 0 and rep["clip_score"]["histogram"]["counts"] == []
    rep = build_report(base.with_columns(pl.lit(0.3, dtype=pl.Float32).alias("clip_score")))
    assert rep["clip_score"]["histogram"]["counts"] == [50]
    json.dumps(rep, allow_nan=False)
    assert "<svg" in render_html(rep)


def test_fetch_status(df, report):
    expected = df["fetch_status"].value_counts()
    assert report["fetch_status"] == {r["fetch_status"]: r["count"] for r in expected.iter_rows(named=True)}


def test_lazy_parquet_scan_matches(df, report, tmp_path):
    for i, part in enumerate(df.partition_by("shard", maintain_order=True)):
        part.write_parquet(tmp_path / f"d{i}.parquet")
    rep = build_report(
        pl.scan_parquet(tmp_path / "*.parquet"), extra_group_columns=("source",), top_groups=100, meta=report["meta"]
    )
    assert rep == report


def test_missing_column_named(df):
    with pytest.raises(ValueError, match="nope"):
        build_report(df, extra_group_columns=("nope",))


def test_html_self_contained_and_escaped(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    t = report["totals"]
    assert f"{t['rows_in']:,}" in page and "," in f"{t['rows_in']:,}"
    assert f"{t['kept']:,}" in page and f"{t['removed']:,}" in page
    assert f"{100 * t['removal_rate']:.1f}%" in page
    assert "reconcile" in page and "DO NOT RECONCILE" not in page
    low = page.lower()
    assert "http://" not in low and "https://" not in low
    assert "<script" not in low  # no script at all: src= or inline, and the hostile domain is escaped
    assert "<link" not in low and "@import" not in low and "url(" not in low and "<img" not in low
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "too small to judge" in page
    assert "<svg" in page and "sel-a" in page and "curate-tiny/bundled" in page
    for r in RULE_ORDER:
        assert html_escaped(REASON_HELP[r]) in page
    assert "(unknown)" in page


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_html_shards_collapse():
    df = make_decisions().with_columns((pl.lit("p-") + (pl.int_range(pl.len()) % 40).cast(pl.String)).alias("shard"))
    page = render_html(build_report(df))
    assert "<details" in page


def test_hostile_meta_and_values_escaped(df):
    evil = '"><img src=x onerror=alert(1)>'
    rep = build_report(df.with_columns(pl.lit(evil).alias("language")), meta={"selection": evil, evil: evil})
    page = render_html(rep)
    assert "<img" not in page and "onerror=alert(1)>" not in page
    assert html_escaped(evil) in page


def test_write_report_local_and_fsspec(report, tmp_path):
    j, h = write_report(report, tmp_path / "out")
    assert json.loads(open(j).read()) == report
    assert open(h).read() == render_html(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]

    import fsspec

    j, h = write_report(report, "memory://reports-test/sel-a")
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat_file("/reports-test/sel-a/report.json")) == report
    assert j == "memory://reports-test/sel-a/report.json"
    assert fs.cat_file("/reports-test/sel-a/report.html").decode().startswith("<!DOCTYPE html>")


def test_empty_selection():
    empty = make_decisions().head(0)
    rep = build_report(empty)
    assert rep["totals"]["rows_in"] == 0 and rep["totals"]["removal_rate"] is None
    assert rep["reconciles"] is True
    json.dumps(rep, allow_nan=False)
    assert "—" in render_html(rep)


def test_flagged_groups_that_tie_are_shown_the_same_whatever_the_row_order():
    """More flagged small groups than top_groups allows, all with the same q-value: the ones shown
    are the same (by value) however the rows arrive, as both selection engines must agree."""
    rows = []
    for i in range(12):  # 12 small groups, each removing all 40 of its rows: flagged, identical q
        rows += [{"domain": f"d{i:02d}.com", "kept": False, "reason": "language"}] * 40
    rows += [{"domain": "big.com", "kept": True, "reason": None}] * 4000
    df = pl.DataFrame(rows).with_columns(
        pl.lit("s0").alias("shard"), pl.lit("tld").alias("tld"), pl.lit("en").alias("language")
    )
    shown = set()
    for seed in range(4):
        frame = df.sample(fraction=1.0, shuffle=True, seed=seed)
        rep = build_report(frame, top_groups=2)
        shown.add(tuple(g["value"] for g in rep["groups"]["domain"]["rows"]))
    assert len(shown) == 1, shown
    values = next(iter(shown))
    assert values[0] == "big.com" and values[1] == "d00.com" and values[2:4] == ("d01.com", "d02.com")
