"""The whole pipeline, end to end, as `curate demo` runs it: real loopback image servers, real
img2dataset, real Ray tasks and actors, the bundled open_clip model. Then re-selection from the
cache (no model), and a rerun with a looser spec that fetches and scores only what it must."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pytest

from curate.demo.data import SITES
from curate.demo.image_server import ImageServer
from curate.demo.run_demo import demo_spec, evaluate, write_inputs
from curate.runner import run

ROWS, SHARDS, SEED = 360, 3, 7


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("demo")
    with contextlib.ExitStack() as stack:
        servers = {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}
        truth = write_inputs(out, ROWS, SHARDS, SEED, servers)
        spec = demo_spec(out)
        result = run(spec)
        assert result.ok, result.failed
        yield {"out": out, "truth": truth, "result": result, "servers": servers, "spec": spec}


def _hits(demo) -> Counter:
    total: Counter = Counter()
    for server in demo["servers"].values():
        total += server.hits
    return total


def _selection(run_dir: str, name: str = "default") -> pl.DataFrame:
    sel = Path(run_dir) / "selections" / name
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed")


def test_demo_quality_bar(demo):
    ev = evaluate(demo["result"].run_dir, demo["truth"])
    assert ev["decided"] == ROWS
    assert ev["mismatched_n"] >= 50 and ev["matched_unique_fetchable_n"] >= 100
    assert ev["mismatched_removed_by_clip"] >= 0.90, ev
    assert ev["matched_unique_fetchable_kept"] >= 0.90, ev
    assert ev["duplicate_groups"] >= 5 and ev["duplicate_groups_keeping_more"] == 0, ev
    # re-encoded copies (another URL, other bytes) are found through the stored embeddings + pHash
    assert ev["near_duplicate_groups"] >= 3 and ev["near_duplicate_groups_keeping_one"] >= 0.9, ev
    assert ev["false_near_duplicates"] <= 0.02 * ev["matched_unique_fetchable_n"], ev


def test_every_row_is_accounted_for_per_shard_and_overall(demo):
    d = _selection(demo["result"].run_dir)
    truth = demo["truth"]
    assert d.height == ROWS
    assert d.select("shard", "row").n_unique() == ROWS
    per_shard_in = truth.group_by("shard").len().sort("shard")
    per_shard_out = d.group_by("shard").len().sort("shard")
    assert per_shard_in.rows() == per_shard_out.rows()
    removed = d.filter(pl.col("kept").not_())
    assert removed["reason"].null_count() == 0
    assert all(len(r) >= 1 and r[0] == reason for r, reason in zip(removed["reasons"], removed["reason"]))
    summary = json.loads((Path(demo["result"].run_dir) / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] is True
    for shard, c in summary["shards"].items():
        assert c["kept"] + c["removed"] == c["rows"] == per_shard_in.filter(pl.col("shard") == shard)["len"].item()


def test_fetch_outcomes_follow_the_ground_truth(demo):
    d = _selection(demo["result"].run_dir).join(
        demo["truth"].select("shard", "row", "row_kind", "gt_language"), on=["shard", "row"]
    )
    allowed = pl.col("gt_language") != "it"
    assert set(d.filter(allowed & (pl.col("row_kind") == "broken_404"))["fetch_status"]) == {"http_4xx"}
    assert set(d.filter(allowed & (pl.col("row_kind") == "corrupt"))["fetch_status"]) == {"decode_error"}
    assert set(d.filter(allowed & (pl.col("row_kind") == "tiny"))["reason"]) <= {
        "image_size",
        "language",
        "caption_length",
    }
    # rows removed by a text rule were never fetched
    assert set(d.filter(pl.col("reason") == "language")["fetch_status"]) == {"not_attempted"}
    # every removed duplicate points at a kept row
    dups = d.filter(pl.col("reason").is_in(["duplicate_url", "duplicate_image", "duplicate_image_near"]))
    assert dups.height >= 5 and (dups["reason"] == "duplicate_image_near").any()
    kept_uids = set(d.filter(pl.col("kept"))["uid"])
    assert set(dups["duplicate_of"]) <= kept_uids


def test_scores_carry_the_model_and_the_manifest_pins_it(demo):
    run_dir = Path(demo["result"].run_dir)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["state"] == "complete"
    assert m["model"]["model"] == "curate-tiny" and len(m["model"]["checkpoint_sha256"]) == 64
    d = _selection(str(run_dir))
    scored = d.filter(pl.col("clip_score").is_not_null())
    assert set(scored["clip_model"]) == {m["model"]["model_id"]}
    assert m["counts"]["rows"] == ROWS and m["counts"]["scored"] == scored.height
    assert sum(m["counts"]["fetch_status"].values()) == ROWS
    assert [i["path"] for i in m["inputs"]] == sorted(i["path"] for i in m["inputs"]) and len(m["inputs"]) == SHARDS


def test_reselection_loads_no_model_and_moves_counts_the_right_way(demo):
    run_dir = demo["result"].run_dir
    base = json.loads((Path(run_dir) / "selections" / "default" / "selection.json").read_text())
    # stricter: the median score of the rows the default selection keeps
    stricter = float(_selection(run_dir).filter(pl.col("kept"))["clip_score"].median())
    assert stricter > base["resolved"]["clip_threshold"]
    code = f"""
import sys, json
from curate.cli import app
from typer.testing import CliRunner
res = CliRunner().invoke(app, ["select", {run_dir!r}, "--name", "strict", "--clip-min-score", "{stricter}"])
assert res.exit_code == 0, res.output
heavy = [m for m in ("torch", "open_clip", "ray", "img2dataset") if m in sys.modules]
print(json.dumps(heavy))
"""
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no model, no Ray, no fetcher imported
    strict = json.loads((Path(run_dir) / "selections" / "strict" / "selection.json").read_text())
    assert strict["counts"]["rows"] == base["counts"]["rows"]
    assert strict["counts"]["kept"] < base["counts"]["kept"]
    d_base, d_strict = _selection(run_dir), _selection(run_dir, "strict")
    assert (d_strict["reason"] == "clip_score").sum() > (d_base["reason"] == "clip_score").sum()
    # a stricter threshold only removes: everything kept now was kept before
    assert set(d_strict.filter(pl.col("kept"))["uid"]) <= set(d_base.filter(pl.col("kept"))["uid"])


def test_report_sweep_and_diff_commands(demo, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    run_dir = demo["result"].run_dir
    cli = CliRunner()
    res = cli.invoke(
        app, ["report", run_dir, "--selection", "default", "--from", "0.5", "--to", "0.95", "--step", "0.05"]
    )
    assert res.exit_code == 0, res.output
    assert (Path(run_dir) / "selections" / "default" / "report.html").stat().st_size > 10_000
    # the demo's image near-dedup makes the sweep a lower bound, and the page says so (docs/REPORTS.md)
    html = (Path(run_dir) / "selections" / "default" / "report.html").read_text()
    assert "Not exact here" in html and "lower bound" in html
    assert (
        "lower bound"
        in json.loads((Path(run_dir) / "selections" / "default" / "report.json").read_text())["sweep"]["near_dedup"]
    )

    out = tmp_path / "sweep.parquet"
    res = cli.invoke(
        app,
        [
            "sweep",
            run_dir,
            "--rule",
            "clip",
            "--from",
            "0.5",
            "--to",
            "0.95",
            "--step",
            "0.05",
            "--group",
            "language",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(out)
    overall = table.filter(pl.col("column") == "(all)").sort("threshold")
    assert overall.height == 10 and overall["rows_in"].unique().to_list() == [ROWS]
    kept = overall["kept"].to_list()
    assert kept == sorted(kept, reverse=True)  # retention never rises with the threshold
    # at a threshold of the sweep, the count equals what a real selection at that threshold keeps
    res = cli.invoke(app, ["select", run_dir, "--name", "at_090", "--clip-min-score", "0.9"])
    assert res.exit_code == 0, res.output
    at_090 = json.loads((Path(run_dir) / "selections" / "at_090" / "selection.json").read_text())["counts"]["kept"]
    assert overall.filter(pl.col("threshold").round(4) == 0.9)["kept"].item() == at_090
    assert table.filter(pl.col("column") == "language").height > 0

    d = _selection(run_dir)

    res = cli.invoke(
        app,
        [
            "diff",
            str(Path(run_dir) / "selections" / "default"),
            str(Path(run_dir) / "selections" / "at_090"),  # made above: this test needs no other test's selection
            "--out",
            str(tmp_path / "diff"),
        ],
    )
    assert res.exit_code == 0, res.output
    diff = json.loads((tmp_path / "diff" / "diff.json").read_text())
    kept_a = set(d.filter(pl.col("kept"))["uid"])
    kept_b = set(_selection(run_dir, "at_090").filter(pl.col("kept"))["uid"])
    assert kept_b < kept_a  # a real difference to measure
    assert diff["jaccard"] == pytest.approx(len(kept_a & kept_b) / len(kept_a | kept_b))


def test_looser_rule_reports_not_scored_then_a_rerun_fetches_only_those_rows(demo):
    run_dir = demo["result"].run_dir
    from curate.config import SelectionConfig
    from curate.selection import write_selection

    spec = demo["spec"]
    loose = spec.selection.model_copy(
        update={"name": "all_languages", "language": spec.selection.language.model_copy(update={"allow": []})}
    )
    write_selection(run_dir, SelectionConfig.model_validate(loose.model_dump()), spec.report)
    d = _selection(run_dir, "all_languages")
    skipped = d.filter(pl.col("fetch_status") == "not_attempted")
    assert skipped.height > 0
    # not fetched earlier, so not scored now: reported, never guessed
    passing_text = skipped.filter(pl.col("reasons").list.contains("caption_length").not_())
    assert passing_text.height > 0
    assert set(passing_text["reason"]) == {"not_scored"}

    hits_before = _hits(demo)
    rerun = spec.with_overrides(**{"selection.language.allow": [], "output.overwrite": False})
    result = run(rerun)
    assert result.ok
    new_requests = _hits(demo) - hits_before
    # exactly one request per skipped row that now passes the text rules, and nothing else
    assert new_requests == Counter(urlsplit(u).path for u in passing_text["url"])
    after = _selection(run_dir)
    assert after.filter(pl.col("reason") == "not_scored").height == 0
    assert after.height == ROWS


def test_the_ray_engine_selects_the_demo_run_the_same(demo):
    """selection.engine = "ray" on the demo run (fetched images, CLIP scores, caption and image
    near-duplicates from stored band keys and embeddings) against the local engine."""
    from engine_support import same_selection

    from curate.selection import write_selection

    run_dir = str(demo["result"].run_dir)
    for engine in ("local", "ray"):
        sel = demo["spec"].selection.model_copy(update={"name": f"engine-{engine}", "engine": engine})
        write_selection(run_dir, sel, demo["spec"].report)
    sels = Path(run_dir) / "selections"
    same_selection(sels / "engine-local", sels / "engine-ray")
    reasons = set(pl.read_parquet(sels / "engine-ray" / "removed" / "*.parquet")["reason"])
    assert {"duplicate_caption", "duplicate_image_near"} & reasons  # the near steps ran on both
