"""Concept tags from stored image embeddings (selection.concepts, curate/concepts.py): scored at
select time by the text tower alone, removed by the registry's `concept` rule family with reason
concept:<name>, and treated like any rule by the files, the report, the sweep, `curate report` and
`curate diff`, on both selection engines.

The run: the synthetic demo (shapes in colours, served from loopback servers, the bundled tiny CLIP,
score.store_embeddings = true) on the in-process executor; its ground truth says what each image
shows (image_shape, image_color).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from engine_support import report_numbers, same_report, same_selection

from curate import concepts, manifest
from curate import selection as selection_mod
from curate.cli import app
from curate.config import PipelineSpec, SelectionConfig, SpecError, parse_spec
from curate.demo import synthetic
from curate.executor import LocalExecutor
from curate.reports.diff import diff

COLORS = list(synthetic.COLORS)
SHAPES = list(synthetic.SHAPES)
# the acceptance bar: tags the concept's rows with ROC-AUC >= 0.9; removes >= 90 % of them, <= 10 % of the rest
AUC, HIT, FALSE_HIT = 0.9, 0.9, 0.1


def colour_concept(colour: str) -> dict:
    """CLIP's zero-shot form: the colour against every other colour, the softmax mass >= 0.5."""
    others = [f"a {c} shape" for c in COLORS if c != colour]
    return {"prompts": [f"a {colour} shape"], "negatives": others, "min_similarity": 0.5}


def shape_concept(shape: str) -> dict:
    others = [f"a {s}" for s in SHAPES if s != shape]
    return {"prompts": [f"a {shape}"], "negatives": others, "min_similarity": 0.5}


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run  # tests/conftest.py: the demo run on the in-process executor, with its ground truth


def _hits(demo) -> int:
    return sum(sum(s.hits.values()) for s in demo["servers"].values())


def _select(demo, name: str, conc: dict, engine: str = "local", run_dir: Path | None = None, **rules) -> Path:
    data = {**demo["spec"].selection.model_dump(mode="json"), **rules, "name": name, "engine": engine}
    data["concepts"] = conc
    run_dir = run_dir or demo["run"]
    selection_mod.write_selection(str(run_dir), SelectionConfig.model_validate(data), demo["spec"].report)
    return run_dir / "selections" / name


def _rows(sel: Path) -> pl.DataFrame:
    """Every row of a selection; kept files hold no reason columns: a kept row's reasons are []."""
    kept = pl.read_parquet(sel / "kept" / "*.parquet")
    rows = pl.concat([kept, pl.read_parquet(sel / "removed" / "*.parquet")], how="diagonal_relaxed")
    return rows.with_columns(pl.col("reasons").fill_null(pl.lit([], pl.List(pl.String))))


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count half): P(score of a positive > of a negative)."""
    ranks = pl.Series(score).rank("average").to_numpy()
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _tagging(sel: Path, truth: pl.DataFrame, name: str, column: str, value: str) -> dict:
    """How concept `name` tags the rows with an image embedding against ground truth `column` ==
    `value`: ROC-AUC of its score, and the shares of those rows and of the others whose reasons
    hold concept:<name> (what a selection removing the concept removes, whatever else fails)."""
    d = _rows(sel).join(truth.select("shard", "row", column), on=["shard", "row"])
    d = d.filter(pl.col(concepts.column(name)).is_not_null())
    truly = (d[column] == value).to_numpy()
    tagged = d["reasons"].list.contains(concepts.reason(name)).to_numpy()
    return {
        "rows": d.height,
        "positives": int(truly.sum()),
        "auc": _auc(truly, d[concepts.column(name)].to_numpy()),
        "hit": float(tagged[truly].mean()),
        "false_hit": float(tagged[~truly].mean()),
    }


@pytest.fixture(scope="module")
def tagged(demo):
    """One selection with a colour concept and a shape concept, and how each tags the demo."""
    sel = _select(demo, "concepts", {"red": colour_concept("red"), "triangle": shape_concept("triangle")})
    return {
        "sel": sel,
        "red": _tagging(sel, demo["truth"], "red", "image_color", "red"),
        "triangle": _tagging(sel, demo["truth"], "triangle", "image_shape", "triangle"),
    }


# --- the text tower ----------------------------------------------------------------------------------


def test_the_text_tower_alone_embeds_as_the_whole_model(monkeypatch):
    """load_text_tower builds no image tower (open_clip's builder refuses here) and gives the whole
    model's normalised text embeddings, bit for bit, its logit scale and its model id."""
    import open_clip.model
    import torch

    from curate.model import load_clip, load_text_tower

    def refuse(*a, **k):
        raise AssertionError("the image tower was built")

    with monkeypatch.context() as m:
        m.setattr(open_clip.model, "_build_vision_tower", refuse)
        tower = load_text_tower("curate-tiny", "bundled")
    whole = load_clip("curate-tiny", "bundled", device="cpu", precision="fp32")
    texts = ["a triangle", "a red circle on a white background", "ein blauer Stern auf grauem Hintergrund"]
    with torch.no_grad():
        want = whole.model.encode_text(whole.tokenizer(texts), normalize=True).numpy()
    assert np.array_equal(tower.encode(texts), want)
    assert tower.logit_scale == pytest.approx(float(whole.model.logit_scale.exp()), rel=1e-7)
    assert tower.model_id == whole.model_id


def test_scores_are_the_max_cosine_or_the_softmax_mass_on_the_prompts():
    rng = np.random.default_rng(0)

    def unit(n, d=16):
        x = rng.normal(size=(n, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    images, pos, neg = unit(50), unit(3), unit(4)
    plain = concepts.ConceptPrompts("a", pos, np.zeros((0, 16), np.float32))
    assert np.allclose(plain.scores(images.astype(np.float64), 50.0), (images @ pos.T).max(axis=1), atol=1e-6)
    with_neg = concepts.ConceptPrompts("b", pos, neg)
    logits = 50.0 * np.concatenate([images @ pos.T, images @ neg.T], axis=1).astype(np.float64)
    mass = np.exp(logits[:, :3]).sum(axis=1) / np.exp(logits).sum(axis=1)  # no max-shift: the plain formula
    got = with_neg.scores(images.astype(np.float64), 50.0)
    assert got.dtype == np.float32 and np.allclose(got, mass, atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()


# --- the acceptance figures on the demo ---------------------------------------------------------------


def test_a_colour_concept_tags_that_colour(tagged):
    """The bar of the issue, met by a colour concept: "a red shape" against the other colours."""
    red = tagged["red"]
    assert red["rows"] >= 250 and red["positives"] >= 20, red  # the demo's images, each with an embedding
    assert red["auc"] >= AUC, red
    assert red["hit"] >= HIT and red["false_hit"] <= FALSE_HIT, red


def test_a_shape_concept_tags_that_shape(tagged):
    """The bar of the issue, for a shape: "a triangle" against the other shapes (softmax mass >= 0.5)."""
    tri = tagged["triangle"]
    assert tri["positives"] >= 30, tri
    assert tri["auc"] >= AUC, tri
    assert tri["hit"] >= HIT and tri["false_hit"] <= FALSE_HIT, tri


def test_every_shape_and_colour_ranks_its_images_first(demo):
    """Not one lucky concept: each of the six shapes and eight colours, as a concept against its
    siblings, ranks its own images above the others (ROC-AUC >= 0.9), and every colour also meets
    the tagging bar. Shapes are held to the ranking only: the hardest, a star (a ten-point polygon
    some 30 px wide), tags 91.2 % of its images at mass >= 0.5 on `curate demo` (97.7 % on this
    run), too close to the 90 % bar for a test that must hold at every host's precision
    (docs/POLICY.md has each figure)."""
    conc = {f"shape_{s}": shape_concept(s) for s in SHAPES} | {f"colour_{c}": colour_concept(c) for c in COLORS}
    sel = _select(demo, "every_concept", conc)
    for name, column, value in [(f"shape_{s}", "image_shape", s) for s in SHAPES] + [
        (f"colour_{c}", "image_color", c) for c in COLORS
    ]:
        got = _tagging(sel, demo["truth"], name, column, value)
        print(name, got)
        assert got["positives"] >= 10, (name, got)
        assert got["auc"] >= AUC, (name, got)
        if column == "image_color":
            assert got["hit"] >= HIT and got["false_hit"] <= FALSE_HIT, (name, got)


# --- the selection records and reports the policy ------------------------------------------------------


def test_the_policy_is_recorded_and_reported(demo, tagged):
    sel = tagged["sel"]
    summary = json.loads((sel / "selection.json").read_text())
    run_model = manifest.read(str(demo["run"]))["model"]["model_id"]
    pol = summary["concepts"]
    assert pol["model_id"] == run_model and pol["logit_scale"] > 1
    red = pol["concepts"]["red"]
    assert red["prompts"] == ["a red shape"] and len(red["negatives"]) == len(COLORS) - 1
    assert red["scoring"] == "softmax_positive_mass" and red["threshold"] == 0.5 == red["min_similarity"]
    assert summary["resolved"]["concept_thresholds"] == {"red": 0.5, "triangle": 0.5}
    assert summary["rules"]["concepts"]["triangle"]["prompts"] == ["a triangle"]
    assert manifest.read(str(demo["run"]))["selection_concepts"]["concepts"] == pol  # the run's audit trail

    rows = _rows(sel)
    report = json.loads((sel / "report.json").read_text())
    assert report["reconciles"] is True, report["problems"]
    by = {r["reason"]: r for r in report["reasons"]}
    order = [r["reason"] for r in report["reasons"]]
    assert order.index("clip_score") + 1 == order.index("concept:red") == order.index("concept:triangle") - 1
    for name in ("red", "triangle"):
        reason = concepts.reason(name)
        assert by[reason]["failed_any"] == int(rows["reasons"].list.contains(reason).sum())
        assert by[reason]["removed_first"] == int((rows["reason"] == reason).sum()) > 0
        for column in ("language", "site"):  # the per-group tables count it like any rule
            groups = report["groups"][column]["rows"]
            assert sum(g["removed_by_reason"][reason] for g in groups) == by[reason]["removed_first"]
    page = (sel / "report.html").read_text()
    assert "Concepts: tags from image embeddings" in page and "a red shape" in page and run_model in page


def test_the_sweep_report_and_diff_treat_a_concept_like_any_rule(demo, tagged):
    """The exact sweep's kept count at the selection's own CLIP threshold is the selection's kept
    count (concept-tagged rows are no representatives); `curate report` re-renders the same numbers;
    `curate diff` names the concept settings that differ."""
    sel = tagged["sel"]
    summary = json.loads((sel / "selection.json").read_text())
    t = summary["resolved"]["clip_threshold"]
    sw = selection_mod.sweep_selection(str(demo["run"]), "concepts", [t - 0.05, t, t + 0.05])
    assert sw["overall"]["kept"][1] == summary["counts"]["kept"]
    before = report_numbers(sel)
    selection_mod.rebuild_report(str(demo["run"]), "concepts")
    same_report(before, report_numbers(sel))

    # a bar at the median score of the rows the concept tags: it must tag fewer of them
    red_scores = _rows(sel).filter(pl.col("reasons").list.contains("concept:red"))[concepts.column("red")]
    bar = float(red_scores.median())
    assert 0.5 < bar < float(red_scores.max())
    other = _select(demo, "concepts-other", {"red": {**colour_concept("red"), "min_similarity": bar}})
    changed = diff(str(sel), str(other))["config"]
    assert changed["rules.concepts.red.min_similarity"] == {"a": 0.5, "b": bar}
    assert changed["resolved.concept_thresholds.red"] == {"a": 0.5, "b": bar}
    assert "rules.concepts.triangle.prompts" in changed
    tagged_red = [int(_rows(s)["reasons"].list.contains("concept:red").sum()) for s in (sel, other)]
    assert 0 < tagged_red[1] < tagged_red[0]  # a higher bar tags fewer rows


# --- both engines ------------------------------------------------------------------------------------


def test_both_engines_tag_and_select_the_same(demo, monkeypatch):
    """selection.engine = ray (its block tasks on the in-process executor) against local: the same
    files (with the concepts' score columns), uids, counts and report, a top fraction ranked by the
    radix select included; the text tower runs once per selection, in the driver."""
    import curate.model

    real = curate.model.load_text_tower
    loads: list[str] = []
    monkeypatch.setattr(curate.model, "load_text_tower", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(selection_mod, "given_or_ray", lambda given=None: LocalExecutor())
    conc = {"blue": colour_concept("blue"), "star": {"prompts": ["a star", "a yellow star"], "top_fraction": 0.15}}
    a = _select(demo, "engines-local", conc, "local")
    b = _select(demo, "engines-ray", conc, "ray", block_rows=130)  # a block per shard
    assert loads == ["curate-tiny", "curate-tiny"]
    same_selection(a, b)
    rows = _rows(b)
    assert {concepts.column("blue"), concepts.column("star")} <= set(rows.columns)
    star = json.loads((b / "selection.json").read_text())["resolved"]["concept_thresholds"]["star"]
    scores = rows[concepts.column("star")].drop_nulls().sort(descending=True)
    assert star == float(scores[int(scores.len() * 0.15)])  # DataComp's --fraction ranking, exactly
    assert int(rows["reasons"].list.contains("concept:star").sum()) == int((scores >= star).sum())


def test_on_ray_the_block_tasks_score_their_own_shards_the_same(demo, ray_session):
    """The Ray engine on real Ray workers (the prompt embeddings pickled to them, each block task
    scoring its shards' embeddings in its own process and thread settings): the same selection as
    the local engine, a top fraction included."""
    conc = {"blue": colour_concept("blue"), "star": {"prompts": ["a star"], "top_fraction": 0.15}}
    a = _select(demo, "ray-local", conc, "local")
    b = _select(demo, "ray-ray", conc, "ray", block_rows=130)
    same_selection(a, b)


# --- no image tower, no fetch ---------------------------------------------------------------------


def test_changing_only_prompts_is_a_select_without_the_image_tower(demo, tmp_path):
    """`curate select --concepts FILE` in a fresh process where building an image tower or a whole
    CLIP fails: it runs, in seconds, loads neither Ray nor the fetcher, and fetches nothing."""
    spec_file = tmp_path / "concepts.toml"
    spec_file.write_text(
        '[concepts.green]\nprompts = ["a green shape"]\n'
        + "negatives = ["
        + ", ".join(f'"a {c} shape"' for c in COLORS if c != "green")
        + "]\nmin_similarity = 0.5\n"
    )
    code = f"""
import json, sys, time
import open_clip.model
import curate.model

def refuse(*a, **k):
    raise AssertionError("an image tower was built")

open_clip.model._build_vision_tower = refuse
curate.model.load_clip = refuse
from typer.testing import CliRunner
from curate.cli import app
t = time.perf_counter()
res = CliRunner().invoke(app, ["select", {str(demo["run"])!r}, "--name", "cli-green", "--concepts", {str(spec_file)!r}])
seconds = time.perf_counter() - t
print(json.dumps({{"exit": res.exit_code, "output": res.output, "seconds": seconds,
                  "loaded": sorted(m for m in ("ray", "img2dataset") if m in sys.modules)}}))
"""
    before = _hits(demo)
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["exit"] == 0, got["output"]
    assert got["loaded"] == [] and _hits(demo) == before  # no Ray, no fetcher, no request
    assert got["seconds"] < 60, got  # the text tower on one prompt set, and the select of 360 rows
    sel = demo["run"] / "selections" / "cli-green"
    summary = json.loads((sel / "selection.json").read_text())
    assert list(summary["rules"]["concepts"]) == ["green"]
    green = _tagging(sel, demo["truth"], "green", "image_color", "green")
    assert green["auc"] >= AUC and green["hit"] >= HIT and green["false_hit"] <= FALSE_HIT, green


def test_a_concepts_file_that_is_not_one_is_refused(demo, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[selection]\nname = "x"\n')
    res = CliRunner().invoke(app, ["select", str(demo["run"]), "--name", "bad", "--concepts", str(bad)])
    assert res.exit_code == 2 and "expected only [concepts.<name>] tables" in res.output, res.output
    bad.write_text('[concepts.x]\nprompts = ["a"]\n')  # no threshold
    res = CliRunner().invoke(app, ["select", str(demo["run"]), "--name", "bad", "--concepts", str(bad)])
    assert (
        res.exit_code == 2 and "selection.concepts.x" in res.output and "min_similarity or top_fraction" in res.output
    )


# --- rows without an embedding, runs without embeddings, a different model ----------------------------


def test_rows_without_an_embedding_are_not_scored_never_kept_silently(demo, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run"], run_dir)
    emb = run_dir / "embeddings" / "part-00001.parquet"
    table = pl.read_parquet(emb)
    dropped = set(table["row"].head(10).to_list())
    table.filter(~pl.col("row").is_in(list(dropped))).write_parquet(emb)
    base = _rows(run_dir / "selections" / "default").filter(pl.col("shard") == "part-00001")
    sel = _select(demo, "partial", {"red": colour_concept("red")}, run_dir=run_dir)
    rows = _rows(sel).filter((pl.col("shard") == "part-00001") & pl.col("row").is_in(list(dropped)))
    assert rows.height == len(dropped)
    assert rows["concept_red"].null_count() == len(dropped)
    assert all("not_scored" in r for r in rows["reasons"])
    was_kept = set(base.filter(pl.col("kept") & pl.col("row").is_in(list(dropped)))["row"])
    assert rows["kept"].sum() == 0  # none of them kept, whether tagged or not: no score, no guess
    assert was_kept and was_kept <= set(rows.filter(pl.col("reason") == "not_scored")["row"])


def test_a_run_without_embeddings_or_with_another_model_is_a_clear_error(demo, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run"], run_dir)
    shutil.rmtree(run_dir / "embeddings")
    with pytest.raises(ValueError, match="score.store_embeddings = true"):
        _select(demo, "none", {"red": colour_concept("red")}, run_dir=run_dir)
    sel = SelectionConfig.model_validate({"concepts": {"red": colour_concept("red")}})
    other = {"model": "curate-tiny", "pretrained": "bundled", "model_id": "curate-tiny/other:000000000000"}
    with pytest.raises(ValueError, match="the image embeddings were made by 'curate-tiny/other"):
        concepts.embed(sel, other)
    with pytest.raises(ValueError, match="names none"):
        concepts.embeddings_model({"model": {"model_id": "input-column:similarity"}}, "RUN")


# --- the spec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conc, message",
    [
        ({"Red": {"prompts": ["a"], "min_similarity": 0.5}}, "lower-case letters"),
        ({"red": {"prompts": [], "min_similarity": 0.5}}, "at least 1 item"),
        ({"red": {"prompts": ["  "], "min_similarity": 0.5}}, "empty or blank"),
        ({"red": {"prompts": ["a"]}}, "min_similarity or top_fraction"),
        ({"red": {"prompts": ["a"], "min_similarity": 0.5, "top_fraction": 0.1}}, "min_similarity or top_fraction"),
        ({"red": {"prompts": ["a"], "negatives": ["b"], "min_similarity": -0.2}}, "probability in [0, 1]"),
        ({"red": {"prompts": ["a"], "top_fraction": 0}}, "greater than 0"),
        ({"red": {"prompts": ["a"], "min_similarity": 0.5, "colour": "red"}}, "Extra inputs"),
    ],
)
def test_a_concept_spec_that_cannot_work_is_refused(conc, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(
            {
                "name": "t",
                "input": {"paths": ["x"]},
                "score": {"store_embeddings": True},
                "selection": {"concepts": conc},
            }
        )


def test_concepts_need_stored_embeddings():
    conc = {"red": {"prompts": ["a red shape"], "min_similarity": 0.3}}
    with pytest.raises(SpecError, match="score.store_embeddings = true"):
        parse_spec({"name": "t", "input": {"paths": ["x"]}, "selection": {"concepts": conc}})
    spec = parse_spec(
        {"name": "t", "input": {"paths": ["x"]}, "score": {"store_embeddings": True}, "selection": {"concepts": conc}}
    )
    assert isinstance(spec, PipelineSpec) and spec.selection.concepts["red"].min_similarity == 0.3
