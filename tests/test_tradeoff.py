"""The retention-disparity trade-off (curate/reports/tradeoff.py, `curate sweep --equalize`): the
proposed thresholds are applied as real selections and each group's removal rate is recomputed
from their kept and removed rows; the report's numbers are recounted the same way."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from test_per_group_threshold import run_dir  # noqa: F401 - the module's run (a fixture)

from curate.cli import app
from curate.config import ReportConfig, SelectionConfig
from curate.reports.tradeoff import _apportion, tradeoff
from curate.selection import sweep_selection, write_selection

BASE = {"clip": {"min_score": 0.2}, "dedup": {"url": True, "image_sha256": False}}


@pytest.fixture(scope="module")
def run(run_dir, tmp_path_factory):  # noqa: F811 - the imported fixture
    """The run with a selection "base" (one threshold, URL dedup) and "all": the same rules with
    the threshold at -1, whose kept rows are the candidates (every CLIP score is >= -1)."""
    run = tmp_path_factory.mktemp("tradeoff") / "run"
    shutil.copytree(run_dir, run)
    write_selection(str(run), SelectionConfig(name="base", **BASE))
    write_selection(str(run), SelectionConfig(name="all", **{**BASE, "clip": {"min_score": -1.0}}))
    return run


def _rows(run, name: str) -> pl.DataFrame:
    d = run / "selections" / name
    kept = pl.read_parquet(d / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    return pl.concat([kept, pl.read_parquet(d / "removed" / "*.parquet")], how="diagonal_relaxed")


def _apply(run, name: str, clip: dict, units: list[str]) -> dict[str, tuple[int, int]]:
    """Write selection `name` with BASE's other rules and this CLIP rule; per language in `units`
    ("(other)" for every other value and none): (its candidates, its kept rows), recomputed from
    the kept and removed rows of "all" and of `name`."""
    write_selection(str(run), SelectionConfig(name=name, **{**BASE, "clip": clip}))
    named = set(units)
    cand, kept = _rows(run, "all").filter(pl.col("kept")), _rows(run, name).filter(pl.col("kept"))
    assert set(kept["uid"]) <= set(cand["uid"])  # a threshold only removes candidates

    def unit(frame: pl.DataFrame) -> dict[str, int]:
        lang = frame["language"].to_list()
        out: dict[str, int] = {}
        for v in lang:
            key = v if v in named else "(other)"
            out[key] = out.get(key, 0) + 1
        return out

    c, k = unit(cand), unit(kept)
    return {g: (c[g], k.get(g, 0)) for g in c}


def test_equalised_thresholds_give_every_group_the_same_removal_rate(run):
    res = sweep_selection(str(run), "base", [], equalize="language", targets=[0.3], max_ratio=1.25)
    to = res["tradeoff"]
    assert to["duplicates"]["key_groups"]["duplicate_url"] == 0  # every copy of a URL has one language
    units = [u["value"] for u in to["units"] if u["value"] != "(other)"]
    assert len(units) >= 3
    (point,) = to["points"]
    k = point["keep"]
    assert k == round(0.3 * to["rows_in"]) and to["rows_in"] == _rows(run, "all").height
    overall = 1 - k / to["candidates"]

    def rates(name: str, policy: dict, clip: dict) -> dict[str, float]:
        """Each unit's removal rate from selection `name`'s rows; checked against the policy's."""
        groups = _apply(run, name, clip, units)
        assert sum(kept for _, kept in groups.values()) == policy["kept"]
        got = {g: 1 - kept / c for g, (c, kept) in groups.items()}
        for g in policy["groups"]:
            if g["candidates"]:
                assert groups[g["value"]] == (g["candidates"], g["kept"]), (name, g["value"])
                assert got[g["value"]] == pytest.approx(g["removal_rate"], abs=1e-12)
        return got

    # (a) one threshold reaching the retention: k rows kept (no ties among these float32 scores)
    one = rates("single", point["single"], {"min_score": point["single"]["threshold"]})
    assert point["single"]["kept"] == k
    assert max(one.values()) - min(one.values()) > 0.02  # a disparity worth equalising
    # (b) equalised: every named unit's threshold; the rates as the kept/removed rows say
    eq = point["equalised"]
    assert set(eq["thresholds"]) == set(units)
    clip = {"min_score": eq["default"], "by": "language", "thresholds": eq["thresholds"]}
    equal = rates("equal", eq, clip)
    assert eq["kept"] == k
    for g, (c, _) in _apply(run, "equal", clip, units).items():
        assert abs(equal[g] - overall) <= 1 / c + 1e-12, g  # the same rate, to one row of the group
    assert max(equal.values()) - min(equal.values()) < max(one.values()) - min(one.values())
    # the cost in score: equal rates keep lower-scoring rows of some groups
    assert eq["score"]["mean"] <= point["single"]["score"]["mean"]
    # max ratio: every named unit's rate within [r / 1.25, r x 1.25]; the others share the default
    mr = point["max_ratio"]
    named = {"by": "language", "thresholds": mr["thresholds"]} if mr["thresholds"] else {}
    bounded = rates("ratio", mr, {"min_score": mr["default"], **named})
    assert mr["kept"] >= k
    assert all(overall / 1.25 - 1e-12 <= bounded[g] <= overall * 1.25 + 1e-12 for g in units), bounded
    assert not all(overall / 1.25 <= one[g] <= overall * 1.25 for g in units)  # one threshold was outside
    assert mr["rate_ratio"] < point["single"]["rate_ratio"]


def test_curate_sweep_prints_both_and_changes_nothing(run):
    before = (run / "selections" / "base" / "selection.json").read_bytes()
    res = CliRunner().invoke(
        app, ["sweep", str(run), "-s", "base", "--equalize", "language", "--target-retention", "0.3"]
    )
    assert res.exit_code == 0, res.output
    out = res.output
    assert "one threshold: clip = { min_score = " in out and "equalised: clip = { min_score = " in out
    assert 'by = "language", thresholds = { ' in out and "0 duplicate key group(s)" in out
    assert (run / "selections" / "base" / "selection.json").read_bytes() == before  # a decision aid only
    far = CliRunner().invoke(
        app, ["sweep", str(run), "-s", "base", "--equalize", "language", "--target-retention", "0.99"]
    )
    assert far.exit_code == 0 and "needs more rows than every other rule leaves" in far.output
    for args, words in (
        (["--equalize", "language"], "needs --target-retention"),
        (["--target-retention", "0.3"], "belong to --equalize"),
        ([], "give --from and --to"),
    ):
        bad = CliRunner().invoke(app, ["sweep", str(run), "-s", "base", *args])
        assert bad.exit_code != 0 and words in bad.output


def test_the_reports_tradeoff_is_what_its_thresholds_select(run):
    rep = json.loads((run / "selections" / "base" / "report.json").read_text())
    to = rep["tradeoff"]
    assert to["column"] == "language"
    own = rep["totals"]["kept"] / rep["totals"]["rows_in"]
    assert any(p["target_retention"] == own for p in to["points"])  # the selection's own point is on the curve
    feasible = [p for p in to["points"] if p["feasible"]]
    assert len(feasible) >= 3 and all(p["target_retention"] <= to["max_retention"] for p in feasible)
    for p in feasible[::2]:  # recounted from real selections (every other point: seconds, not minutes)
        eq = p["equalised"]
        clip = {"min_score": eq["default"], "by": "language", "thresholds": eq["thresholds"]}
        units = [u["value"] for u in to["units"] if u["value"] != "(other)"]
        groups = _apply(run, "check", clip, units)
        for g in eq["groups"]:
            if g["candidates"]:
                assert groups[g["value"]] == (g["candidates"], g["kept"]), (p["target_retention"], g["value"])
        single = _apply(run, "check", {"min_score": p["single"]["threshold"]}, units)
        assert sum(k for _, k in single.values()) == p["single"]["kept"]
    html = (run / "selections" / "base" / "report.html").read_text()
    assert "Trade-off: retention vs disparity by language" in html and 'aria-label="removal rate vs retention"' in html
    assert feasible[0]["equalised"]["spec"].replace('"', "&quot;") in html


def test_shares_add_up_and_ties_are_kept(run):
    for k, w in ((10, [3, 3, 3]), (7, [5, 1, 1, 100]), (0, [4, 2]), (6, [4, 2])):
        s = _apportion(k, w)
        assert sum(s) == k and all(abs(x - k * wi / sum(w)) < 1 for x, wi in zip(s, w))
    # ties at a threshold are all kept (score >= threshold), and the counts say so
    reps = pl.DataFrame({"_score": [0.5, 0.4, 0.4, 0.4, 0.1] * 20, "g": ["a", "a", "b", "b", "b"] * 20})
    res = tradeoff(reps, reps.select("g"), "g", [0.5], score_dtype=pl.Float64, min_candidates=1)
    (p,) = res["points"]
    assert p["single"]["threshold"] == 0.4 and p["single"]["kept"] == 80 > p["keep"] == 50
    by = {g["value"]: g for g in p["equalised"]["groups"]}
    # shares 20 and 30: a's 20th highest is 0.5 (20 rows); b's 30th is 0.4, a tie of 40 rows
    assert (by["a"]["kept"], by["b"]["kept"]) == (20, 40) and p["equalised"]["kept"] == 60
    np.testing.assert_equal(p["equalised"]["thresholds"], {"a": 0.5, "b": 0.4})


def test_curate_sweep_uses_the_runs_min_group_size_as_the_report_does(run, tmp_path):
    """A group gets its own threshold with report.min_group_size candidates (the run's spec), in
    `curate sweep --equalize` as in the report: the same groups either way."""
    base = sweep_selection(str(run), "base", [], equalize="language", targets=[0.3])["tradeoff"]
    sizes = sorted(u["candidates"] for u in base["units"] if u["value"] != "(other)")
    assert len(sizes) >= 2 and sizes[0] < sizes[-1]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["spec"]["report"]["min_group_size"] = sizes[0] + 1  # the smallest group no longer has its own
    (copy / "manifest.json").write_text(json.dumps(m))
    got = sweep_selection(str(copy), "base", [], equalize="language", targets=[0.3])["tradeoff"]
    named = [u["value"] for u in got["units"] if u["value"] != "(other)"]
    assert len(named) == len(sizes) - 1 and all(u["candidates"] > sizes[0] for u in got["units"][:-1])
    # the report of a selection written under that spec names the same groups
    write_selection(str(copy), SelectionConfig(name="again", **BASE), ReportConfig(min_group_size=sizes[0] + 1))
    rep = json.loads((copy / "selections" / "again" / "report.json").read_text())["tradeoff"]
    assert [u["value"] for u in rep["units"] if u["value"] != "(other)"] == named
