"""Disparity net of the policy that defines the group (curate/reports/policy_net.py): on the real
LAION sample with an English-only selection the language rule removes every French, German,
Spanish ... caption, true, intended and flagged over all rows. The net-of-policy view compares the
languages among the rows that pass the language rule: it flags none for the language rule itself,
and its numbers (rows per group, removed, rate, Wilson interval, p, BH q, flag) are recomputed here
from the selection's kept/removed parquet files with plain polars and scipy. Both engines give the
same net numbers."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import polars as pl
import pytest
from scipy.stats import binomtest, false_discovery_control, norm

from engine_support import same_selection

from curate.config import SelectionConfig, load_spec
from curate.executor import LocalExecutor
from curate.presets import preset_path
from curate.reports import sources
from curate.reports.audit import read_table
from curate.reports.policy_net import targeting
from curate.reports.summary import build_report
from curate.runner import run
from curate.selection import write_selection

MIN_GROUP = 30  # the report's default min_group_size (ReportConfig)
ALPHA = 0.05
MULTI = ["en", "de", "fr", "es", "it"]  # an allow-list that leaves several languages to compare


@pytest.fixture(scope="module")
def laion_run(tmp_path_factory, laion_sample):
    """The LAION sample in 4 shards (so the Ray engine's blocks cut the pool), annotated once with
    the laion_sample preset (no fetch, no model); its default selection is English-only."""
    d = tmp_path_factory.mktemp("policy_net")
    rows = pl.read_parquet(laion_sample)
    (d / "in").mkdir()
    for i in range(4):
        rows.slice(i * 2_500, 2_500).write_parquet(d / "in" / f"part-{i}.parquet")
    out = d / "run"
    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{"input.paths": [str(d / "in")], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    assert spec.selection.language.allow == ["en"]
    return out, spec


@pytest.fixture(scope="module")
def multi(laion_run):
    """The same run, languages MULTI allowed (local engine): several groups pass the policy."""
    out, spec = laion_run
    sel = spec.selection.model_dump()
    sel["name"], sel["language"] = "multi", {**sel["language"], "allow": MULTI}
    write_selection(str(out), SelectionConfig.model_validate(sel), spec.report)
    return out / "selections" / "multi"


def _rows(sel_dir) -> pl.DataFrame:
    """Every decided row, from the selection's kept and removed parquet files (a kept row fails no
    rule: its reasons are empty)."""
    cols = ["shard", "row", "language", "domain", "kept"]
    kept = pl.read_parquet(sel_dir / "kept" / "*.parquet", columns=cols).with_columns(
        pl.lit(None, pl.String).alias("reason"), pl.lit([], pl.List(pl.String)).alias("reasons")
    )
    removed = pl.read_parquet(sel_dir / "removed" / "*.parquet", columns=[*cols, "reason", "reasons"])
    both = pl.concat([kept, removed])
    assert both.select("shard", "row").n_unique() == both.height
    return both


def _reference(rows: pl.DataFrame, column: str, policy: list[str]) -> tuple[pl.DataFrame, dict]:
    """The net-of-policy table recomputed from the rows: a row is excluded when its reasons hold a
    policy rule (whatever its first reason); rate, Wilson interval (scipy), pooled two-proportion
    z-test against the rest of the passing rows, Benjamini-Hochberg (scipy) over the groups with
    at least MIN_GROUP passing rows."""
    hit = pl.col("reasons").list.set_intersection(pl.lit(policy)).list.len() > 0
    g = (
        rows.group_by(column)
        .agg(
            (~hit).sum().alias("rows_in"),
            (~hit & ~pl.col("kept")).sum().alias("removed"),
            hit.sum().alias("excluded"),
            (~hit & (pl.col("reason") == policy[0])).sum().alias("removed_by_policy_rule"),
        )
        .sort(["rows_in", column], descending=[True, False])
    )
    n_all, x_all = int(g["rows_in"].sum()), int(g["removed"].sum())
    recs = []
    for r in g.iter_rows(named=True):
        n, x = r["rows_in"], r["removed"]
        ci = binomtest(x, n).proportion_ci(method="wilson") if n else None
        p = None
        if n >= MIN_GROUP and n_all - n > 0:
            n2, x2 = n_all - n, x_all - x
            pooled = (x + x2) / (n + n2)
            se = math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / n2))
            p = 1.0 if se == 0 else float(2 * norm.sf(abs(x / n - x2 / n2) / se))
        recs.append({**r, "rate": x / n if n else None, "lo": ci and ci.low, "hi": ci and ci.high, "p": p})
    ps = [r["p"] for r in recs if r["p"] is not None]
    qs = iter(false_discovery_control(ps, method="bh")) if ps else iter(())
    for r in recs:
        r["q"] = float(next(qs)) if r["p"] is not None else None
        r["flag"] = r["q"] is not None and r["q"] < ALPHA
    totals = {"rows_in": n_all, "removed": x_all, "excluded": int(g["excluded"].sum())}
    return pl.DataFrame(recs, infer_schema_length=None), totals


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _check_net(sel_dir, column: str, policy: list[str]) -> tuple[dict, pl.DataFrame]:
    """The report's net view of `column` (shown rows, summary, and the full table on disk) against
    the reference recomputed from the selection's files."""
    rep = json.loads((sel_dir / "report.json").read_text())
    sec = rep["groups"][column]
    pol = sec["policy"]
    ref, tot = _reference(_rows(sel_dir), column, policy)
    assert pol["rules"] == policy
    assert pol["excluded_rows"] == tot["excluded"] > 0
    assert pol["totals"]["rows_in"] == tot["rows_in"] and pol["totals"]["removed"] == tot["removed"]
    assert pol["groups_excluded_entirely"] == int((ref["rows_in"] == 0).sum())
    by_value = {r[column]: r for r in ref.iter_rows(named=True)}
    net = pol["net"]
    assert net["distinct"] == ref.height and net["flagged_groups"] == int(ref["flag"].sum())
    shown = [g for g in net["rows"] if not g["other_groups"]]
    assert shown and net["reconciles"]
    for g in shown:
        r = by_value[g["value"]]
        assert (g["rows_in"], g["removed"], g["excluded_by_policy"]) == (r["rows_in"], r["removed"], r["excluded"])
        assert _close(g["removal_rate"], r["rate"]) and g["significant"] == r["flag"]
        assert _close(g["q_value"], r["q"]) and _close(g["p_value"], r["p"])
        if r["rows_in"]:
            assert _close(g["ci95"][0], r["lo"]) and _close(g["ci95"][1], r["hi"])
        assert g["removed_by_reason"][policy[0]] == r["removed_by_policy_rule"] == 0
    # the rows of the view add up to the passing rows' totals (the rollup holds the rest)
    for k in ("rows_in", "removed", "excluded_by_policy"):
        want = tot["excluded"] if k == "excluded_by_policy" else tot[k]
        assert sum(g[k] for g in net["rows"]) == want, k
    # every group, shown or not, in the full table the selection wrote
    full = read_table(str(sel_dir / "tables"), f"groups_net_of_policy_{column}")
    assert full.height == ref.height
    for t in full.iter_rows(named=True):
        r = by_value[t["value"]]
        assert (t["rows_in"], t["removed"], t["excluded_by_policy"]) == (r["rows_in"], r["removed"], r["excluded"])
        assert _close(t["q_value"], r["q"]) and t["significant"] == r["flag"]
        assert _close(t["ci_lo"], r["lo"]) and _close(t["ci_hi"], r["hi"])
    # the grouping's own rows (all rows) carry the excluded counts too
    for g in sec["rows"]:
        if not g["other_groups"]:
            assert g["excluded_by_policy"] == by_value[g["value"]]["excluded"], g["value"]
    assert sum(g["excluded_by_policy"] for g in sec["rows"]) == tot["excluded"]
    return rep, ref


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2>", start + 4)
    return page[start : end if end > 0 else len(page)]


def test_english_only_net_of_policy_flags_no_language_for_the_language_rule(laion_run):
    out, _ = laion_run
    sel_dir = out / "selections" / "default"
    rep, ref = _check_net(sel_dir, "language", ["language"])
    sec = rep["groups"]["language"]
    # over all rows the language rule's exclusions are flagged: groups removed entirely by it
    by_policy = [
        g
        for g in sec["rows"]
        if g["significant"] and not g["other_groups"] and g["removed_by_reason"]["language"] == g["removed"]
    ]
    assert {g["value"] for g in by_policy} >= {"fr", "de", "es"}
    assert all(g["removal_rate"] == 1.0 for g in by_policy)
    # net of the policy: no language flagged, and none of its removals is the language rule's
    net = sec["policy"]["net"]
    assert net["flagged_groups"] == 0 and not any(g["significant"] for g in net["rows"])
    assert sum(g["removed_by_reason"]["language"] for g in net["rows"]) == 0
    assert ref.filter(pl.col("rows_in") > 0)["language"].to_list() == ["en"]  # English only passes
    # no rule targets domain or tld by design: no net view there
    assert rep["groups"]["domain"]["policy"] is None and rep["groups"]["tld"]["policy"] is None
    assert rep["settings"]["disparities_lead"] == "net_of_policy"
    assert rep["settings"]["policy_targets"] == {"language": ["language"]}
    # the page: the disparities table leads with the net view and says so; both views are on it
    page = (sel_dir / "report.html").read_text()
    disp = _section(page, "Disparities")
    assert "leads with the <strong>net-of-policy</strong> view" in disp
    assert "<td>language</td>" not in disp and "<td>language (net of language)</td>" not in disp
    everything = sum(s["flagged_groups"] for s in rep["groups"].values())
    lead = sum(s["flagged_groups"] for c, s in rep["groups"].items() if c != "language")
    assert f"{everything} groups are flagged ({lead} here)" in disp
    pol = _section(page, "Excluded by policy")
    assert re.search(r"The language rule excludes [\d,]+ rows", pol)
    assert f"{sec['policy']['groups_excluded_entirely']} of {net['distinct']} groups entirely" in pol
    assert "By language, net of language" in pol
    plain = _section(page, "Who is removed")
    assert "removed MORE than the rest" in plain  # the view over all rows keeps its flags


def test_several_languages_allowed_recomputed_from_the_files(multi):
    rep, ref = _check_net(multi, "language", ["language"])
    passing = ref.filter(pl.col("rows_in") >= MIN_GROUP)
    assert set(passing["language"]) >= {"en", "de", "fr"}  # several groups tested against each other
    assert rep["groups"]["language"]["policy"]["net"]["tested_groups"] == passing.height


def test_the_targeting_rules_come_from_the_registry_and_the_spec():
    assert targeting(["language", "domain", "tld"]) == {"language": ("language",), "domain": (), "tld": ()}
    per_language = SelectionConfig.model_validate(
        {"clip": {"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28}}}
    )
    # a per-group CLIP threshold keyed on a column targets that column (the rule reads it: spec_inputs)
    assert targeting(["language", "domain"], per_language) == {"language": ("language", "clip_score"), "domain": ()}


def _decided(n: int = 400) -> pl.DataFrame:
    """Rows in two languages and four domains, decided by hand: language failures (some removed
    first by missing_url), CLIP failures, caption failures, kept."""
    rng = np.random.default_rng(7)
    lang = rng.choice(["en", "de"], n).tolist()
    domain = rng.choice(["a.com", "b.com", "c.org", "d.net"], n).tolist()
    pick = rng.integers(0, 5, n)
    reasons = [
        [[], ["missing_url", "language"], ["language"], ["clip_score"], ["caption_length"]][k] for k in pick.tolist()
    ]
    return pl.DataFrame(
        {
            "shard": [f"s{i % 3}" for i in range(n)],
            "row": list(range(n)),
            "kept": [not r for r in reasons],
            "reason": [r[0] if r else None for r in reasons],
            "reasons": reasons,
            "language": lang,
            "domain": domain,
            "tld": [d.rsplit(".", 1)[1] for d in domain],
        },
        schema_overrides={"reasons": pl.List(pl.String)},
    )


def test_a_neutral_first_reason_still_counts_as_excluded_by_policy():
    """A row removed first by missing_url that also fails the language rule is excluded by policy;
    a per-group CLIP threshold on language makes CLIP failures policy too, for language only."""
    df = _decided()
    fails_lang = pl.col("reasons").list.contains("language")
    fails_clip = pl.col("reasons").list.contains("clip_score")
    plain = build_report(df, min_group_size=1)["groups"]["language"]["policy"]
    assert plain["rules"] == ["language"]
    assert plain["excluded_rows"] == df.filter(fails_lang).height
    assert df.filter(fails_lang & (pl.col("reason") == "missing_url")).height > 0  # the case is there
    sel = SelectionConfig.model_validate(
        {"language": {"allow": ["en", "de"]}, "clip": {"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28}}}
    )
    rep = build_report(df, min_group_size=1, selection=sel)
    pol = rep["groups"]["language"]["policy"]
    assert pol["rules"] == ["language", "clip_score"]
    assert pol["excluded_rows"] == df.filter(fails_lang | fails_clip).height
    passing = df.filter(~(fails_lang | fails_clip))
    for g in pol["net"]["rows"]:
        rows = passing.filter(pl.col("language") == g["value"])
        assert (g["rows_in"], g["removed"]) == (rows.height, rows.filter(~pl.col("kept")).height)
        assert g["removed_by_reason"]["clip_score"] == g["removed_by_reason"]["language"] == 0
    assert rep["groups"]["domain"]["policy"] is None  # nothing targets domain
    assert rep["reconciles"], rep["problems"]


def test_both_engines_give_the_same_net_numbers(laion_run, multi, ray_session, monkeypatch):
    """selection.engine = "ray" over 4 blocks (the counts of language in several parts) against the
    local engine: the same files and report numbers (engine_support.same_selection compares every
    number of report.json, the net views included) and the same full net table."""
    out, spec = laion_run
    monkeypatch.setattr(sources, "ROWS_PER_PART", 50)  # the driver sizes the parts: language in several
    monkeypatch.setattr(sources, "OBJECT_ROWS", 1)
    sel = spec.selection.model_dump()
    sel.update(name="multi-ray", engine="ray", block_rows=2_500, language={**sel["language"], "allow": MULTI})
    write_selection(str(out), SelectionConfig.model_validate(sel), spec.report)
    ray_dir = out / "selections" / "multi-ray"
    same_selection(multi, ray_dir)
    parts = list((ray_dir / "tables").glob("groups_net_of_policy_language.*.parquet"))
    assert len(parts) > 1  # the Ray engine's net table really was computed in parts
    name = "groups_net_of_policy_language"
    a = read_table(str(multi / "tables"), name).sort("value")
    b = read_table(str(ray_dir / "tables"), name).sort("value")
    assert a.equals(b)
    rep = json.loads((ray_dir / "report.json").read_text())
    assert rep["groups"]["language"]["policy"]["net"]["tested_groups"] >= 3


def test_curate_report_prints_the_lead_views_flag_count(laion_run):
    """`curate report` says how many groups are flagged net of policy (the page's lead view), and
    how many over all rows, from the report it re-rendered."""
    from typer.testing import CliRunner

    from curate.cli import app

    out, _ = laion_run
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "selections" / "default" / "report.json").read_text())
    everything = sum(s["flagged_groups"] for s in rep["groups"].values())
    lead = sum(((s["policy"] or {}).get("net") or s)["flagged_groups"] for s in rep["groups"].values())
    assert lead < everything  # the language rule's own exclusions are not in the lead view
    assert f"{lead} group(s) flagged net of policy ({everything} over all rows)" in res.output
