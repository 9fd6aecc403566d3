"""Per-group CLIP thresholds (selection.clip.by / thresholds): the LAION-5B pair as a preset, the
kept set against numpy on the scores, the spec's checks, the sweep (the default varies, every
group's threshold moves with it) against decide() at every point, flips, `curate diff`, and the Ray
engine against the local one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from engine_support import same_selection

from curate import annotations, selection
from curate.cli import app
from curate.config import ClipRule, SelectionConfig, SpecError, load_spec, parse_spec
from curate.executor import LocalExecutor
from curate.filters.decide import decide
from curate.presets import preset_path
from curate.reports.diff import diff
from curate.reports.sweep import flips, representatives, shifted, spanning_duplicates, sweep, thresholds
from curate.runner import run
from curate.selection import write_selection

N = 300  # rows per shard, 3 shards
LANGS = np.array(["en", "de", "fr", "pl", None], dtype=object)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A metadata run (no fetch, no model) whose rows carry a language that every copy of a URL
    shares (`lang`, an input column) and a `source` column that copies do not share; the
    annotations' language is set from `lang` after the run (the detector would say "en" to all)."""
    d = tmp_path_factory.mktemp("pergroup")
    rng = np.random.default_rng(7)
    lang_of_url = LANGS[rng.integers(0, len(LANGS), 500)]
    for s in range(3):
        url_id = rng.integers(0, 500, N)  # repeats: URL duplicates within and across shards
        score = rng.normal(0.27, 0.04, N).astype(np.float32)
        score[rng.random(N) < 0.03] = np.nan  # no score: not_scored, never compared
        pl.DataFrame(
            {
                "uid": [hashlib.md5(f"{s}-{i}".encode()).hexdigest() for i in range(N)],
                "url": [f"https://img{x % 3}.example.com/{x}.jpg" for x in url_id],
                "text": [f"a photo number {i} of shard {s}" for i in range(N)],
                "original_width": rng.integers(50, 1200, N),
                "original_height": rng.integers(50, 1200, N),
                "clip_l14_similarity_score": score,
                "lang": pl.Series(list(lang_of_url[url_id]), dtype=pl.String),
                "source": np.array(["web", "book", "news"])[rng.integers(0, 3, N)],
            }
        ).write_parquet(d / f"{s:08d}.parquet")
    out = d / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{
            "input.paths": [str(d)],
            "input.keep_columns": ["lang", "source"],
            "output.dir": str(out),
            "selection.clip": {"min_score": 0.26},
        }
    )
    assert run(spec, executor=LocalExecutor()).ok
    for p in sorted((out / "annotations").glob("*.parquet")):
        pl.read_parquet(p).with_columns(pl.col("lang").alias("language")).write_parquet(p)
    return str(out)


def _rows(sel_dir: Path) -> pl.DataFrame:
    kept = pl.read_parquet(sel_dir / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel_dir / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed").sort("shard", "row")


NO_DEDUP = {"url": False, "image_sha256": False}


def test_the_laion5b_preset_is_the_laion_pair_and_keeps_what_numpy_keeps(run_dir, tmp_path):
    clip = load_spec(preset_path("laion5b")).selection.clip
    assert (clip.by, clip.min_score, clip.thresholds) == ("language", 0.26, {"en": 0.28})
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_selection(str(run), SelectionConfig(name="laion", clip=clip, dedup=NO_DEDUP))
    d = _rows(run / "selections" / "laion")
    score = d["clip_score"].to_numpy()  # float32, as annotated
    assert score.dtype == np.float32
    lang = d["language"].to_numpy()
    # LAION's rule, as a float32 comparison: >= 0.28 for English, >= 0.26 for any other language or none
    threshold = np.where(lang == "en", np.float32(0.28), np.float32(0.26))
    expected = set(d["uid"].filter(pl.Series(~np.isnan(score) & (score >= threshold))))
    assert set(d.filter(pl.col("kept"))["uid"]) == expected
    # both thresholds did work: English rows between 0.26 and 0.28 are removed, others there kept
    band = (score >= np.float32(0.26)) & (score < np.float32(0.28))
    assert (band & (lang == "en")).sum() > 5 and (band & (lang != "en")).sum() > 5
    clip_removed = d.filter(pl.col("reason") == "clip_score")
    assert clip_removed.height == int((~np.isnan(score) & (score < threshold)).sum())
    assert set(d.filter(pl.col("reason") == "not_scored")["uid"]) == set(d["uid"].filter(pl.Series(np.isnan(score))))
    assert json.loads((run / "selections" / "laion" / "selection.json").read_text())["rules"]["clip"] == {
        "min_score": 0.26,
        "top_fraction": None,
        "by": "language",
        "thresholds": {"en": 0.28},
    }


def test_per_source_thresholds_from_an_input_column_and_the_select_flag(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    args = ["select", str(run), "--name", "by-source", "--clip-min-score", "0.25"]
    args += ["--clip-thresholds", "source:book=0.3,news=0.22", "--no-dedup-url", "--no-dedup-image"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    d = _rows(run / "selections" / "by-source")
    score, source = d["clip_score"].to_numpy(), d["source"].to_numpy()
    t = np.select([source == "book", source == "news"], [np.float32(0.3), np.float32(0.22)], np.float32(0.25))
    assert d["kept"].to_list() == (~np.isnan(score) & (score >= t)).tolist()
    bad = CliRunner().invoke(app, ["select", str(run), "--name", "x", "--clip-thresholds", "book=0.3"])
    assert bad.exit_code != 0 and "COLUMN:VALUE=THRESHOLD" in bad.output


def test_impossible_rules_are_refused_by_name(run_dir):
    minimal = {"name": "t", "input": {"paths": ["x.parquet"]}}
    for clip, words in (
        ({"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28}, "top_fraction": 0.3}, "not both"),
        ({"top_fraction": 0.3, "by": "language", "thresholds": {"en": 0.28}}, "top fraction ranks the whole pool"),
        ({"by": "language", "thresholds": {"en": 0.28}}, "needs clip.min_score"),
        ({"min_score": 0.26, "by": "language", "thresholds": {}}, "empty clip.thresholds"),
        ({"min_score": 0.26, "thresholds": {"en": 0.28}}, "needs clip.by"),
        ({"min_score": 0.26, "by": "language", "thresholds": {"english": 0.28}}, "unknown language code"),
        ({"min_score": 0.26, "by": "language", "thresholds": {"en": 1.28}}, "less than or equal to 1"),
        ({"min_score": 0.26, "by": "clip_score", "thresholds": {"0.3": 0.28}}, "cannot be chosen by the score"),
        ({"min_score": 0.26, "by": "languge", "thresholds": {"en": 0.28}}, "not an annotation column"),
        ({"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28}, "per": 1}, "selection.clip.per"),
    ):
        with pytest.raises(SpecError, match=words):
            parse_spec({**minimal, "selection": {"clip": clip}}, source="spec.toml")
    with pytest.raises(SpecError, match="annotate.language = false"):
        parse_spec(
            {
                **minimal,
                "annotate": {"language": False},
                "selection": {"clip": {"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28}}},
            }
        )
    kept = {"min_score": 0.26, "by": "site", "thresholds": {"a": 0.28}}
    assert parse_spec({**minimal, "input": {"paths": ["x"], "keep_columns": ["site"]}, "selection": {"clip": kept}})
    # codes as the model emits them (lower case), as language.allow takes them
    assert ClipRule(min_score=0.2, by="language", thresholds={"EN": 0.3}).thresholds == {"en": 0.3}
    # a run whose annotations lack the column: said before anything is decided, on both engines
    sel = SelectionConfig(clip={"min_score": 0.26, "by": "site", "thresholds": {"a": 0.28}})
    with pytest.raises(ValueError, match="'site'.*not a column of the annotations"):
        decide(annotations.scan(run_dir), sel)
    from curate import distributed_decide

    with pytest.raises(ValueError, match="'site'.*not a column of the annotations"):
        distributed_decide.decide_blocks(run_dir, annotations.completed_shards(run_dir), sel, 0.26, LocalExecutor())


CLIP = {"min_score": 0.26, "by": "language", "thresholds": {"en": 0.28, "de": 0.25}}


def test_the_sweep_moves_every_group_with_the_default_and_equals_decide(run_dir):
    ann = annotations.scan(run_dir)
    sel = SelectionConfig(clip=CLIP, dedup={"url": True, "image_sha256": False})
    # every copy of a URL has one language: the representatives stand for every point
    check = spanning_duplicates(ann, sel, pl.col("language"))
    assert check == {"key_groups": {"duplicate_url": 0, "duplicate_uid": 0}, "checked": True}
    thr = thresholds(0.2, 0.32, 0.02) + [0.26]
    res = sweep(ann, sel, thr, group_columns=["language"], top_groups=10)
    assert res["per_group"]["thresholds"]["en"][res["thresholds"].index(0.26)] == 0.28
    for i, t in enumerate(res["thresholds"]):
        moved = shifted(sel.clip, t)
        assert moved == {"en": round(t + 0.02, 10), "de": round(t - 0.01, 10)}
        d, _ = decide(ann, sel.model_copy(update={"clip": ClipRule(**{**CLIP, "min_score": t, "thresholds": moved})}))
        d = d.collect()
        assert res["overall"]["kept"][i] == int(d["kept"].sum()), t
        want = {
            ("(unknown)" if r["language"] is None else r["language"]): r["kept"]
            for r in d.group_by("language").agg(pl.col("kept").sum()).iter_rows(named=True)
        }
        assert {g["value"]: g["kept"][i] for g in res["groups"]["language"]} == want, t
    # at the spec's own point the sweep is the selection
    own, _ = decide(ann, sel)
    assert res["overall"]["kept"][res["thresholds"].index(0.26)] == int(own.collect()["kept"].sum())
    # flips between two points: exactly the rows kept at the lower and removed at the higher
    reps = representatives(ann, sel, keep=["uid", "language"]).collect()
    f = flips(reps, 0.24, 0.28, group_columns=["language"], sample=10_000, score_dtype=pl.Float32, clip=sel.clip)
    at = {}
    for t in (0.24, 0.28):
        d, _ = decide(
            ann,
            sel.model_copy(update={"clip": ClipRule(**{**CLIP, "min_score": t, "thresholds": shifted(sel.clip, t)})}),
        )
        at[t] = set(d.filter(pl.col("kept")).collect()["uid"])
    assert at[0.28] <= at[0.24] and f["rows"] == len(at[0.24] - at[0.28]) > 0
    assert {r["uid"] for r in f["sample"]} == at[0.24] - at[0.28]


def test_duplicates_that_span_thresholds_are_counted(run_dir):
    """`source` differs between copies of a URL: with URL dedup on and per-source thresholds, a
    copy below its source's threshold can let another copy survive that the sweep counts removed.
    The check counts those URL groups, and the sweep is indeed off there (why it is checked)."""
    ann = annotations.scan(run_dir)
    clip = {"min_score": 0.26, "by": "source", "thresholds": {"book": 0.3}}
    sel = SelectionConfig(clip=clip, dedup={"url": True, "image_sha256": False})
    check = spanning_duplicates(ann, sel, pl.col("source"))
    mixed = ann.group_by("url_normalized").agg(pl.col("source").n_unique()).filter(pl.col("source") > 1)
    assert check["key_groups"]["duplicate_url"] == mixed.select(pl.len()).collect().item() > 0
    res = sweep(ann, sel, [0.26], group_columns=["source"])
    d, _ = decide(ann, sel)
    assert res["overall"]["kept"][0] != int(d.collect()["kept"].sum())
    # without URL dedup nothing spans, and the sweep is the selection again
    alone = sel.model_copy(update={"dedup": sel.dedup.model_copy(update={"url": False})})
    assert sum(spanning_duplicates(ann, alone, pl.col("source"))["key_groups"].values()) == 0
    d, _ = decide(ann, alone)
    assert sweep(ann, alone, [0.26], group_columns=["source"])["overall"]["kept"][0] == int(d.collect()["kept"].sum())


def test_curate_sweep_and_curate_diff_show_per_group_thresholds(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_selection(str(run), SelectionConfig(name="a", clip=CLIP, dedup={"url": True}))
    b_clip = {"min_score": 0.26, "by": "language", "thresholds": {"en": 0.3, "pl": 0.24}}
    write_selection(str(run), SelectionConfig(name="b", clip=b_clip, dedup={"url": True}))
    res = CliRunner().invoke(app, ["sweep", str(run), "-s", "a", "--from", "0.24", "--to", "0.3", "-g", "language"])
    assert res.exit_code == 0, res.output
    assert "per-group thresholds by language" in res.output and "en +0.02" in res.output and "de -0.01" in res.output
    d = diff(str(run / "selections" / "a"), str(run / "selections" / "b"))
    assert d["config"]["rules.clip.thresholds.en"] == {"a": 0.28, "b": 0.3}
    assert d["config"]["rules.clip.thresholds.pl"] == {"a": None, "b": 0.24}
    assert d["config"]["rules.clip.thresholds.de"] == {"a": 0.25, "b": None}
    rows = {r["value"]: (r["a"], r["b"], r["changed"]) for r in d["clip_thresholds"]["groups"]}
    assert rows == {
        "en": (0.28, 0.3, True),
        "de": (0.25, 0.26, True),  # B has no de threshold: its default
        "pl": (0.26, 0.24, True),
        "(every other value)": (0.26, 0.26, False),
    }
    # the retention change follows: English rows lose, Polish rows gain
    lang = {r["value"]: r["change"] for r in d["groups"]["language"]}
    assert lang["en"] < 0 < lang["pl"]
    cli = CliRunner().invoke(app, ["diff", str(run / "selections" / "a"), str(run / "selections" / "b")])
    assert cli.exit_code == 0 and "CLIP threshold for en: 0.28 -> 0.3" in cli.output


def test_the_ray_engine_decides_per_group_thresholds_as_the_local_one(run_dir, tmp_path, monkeypatch):
    """engine = "ray" (its tasks on an in-process executor: the same task functions, blocks,
    shuffles and block-wise report questions) against engine = "local": same files, uids and report."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    asked = []  # the Ray engine asks for its executor; the local engine never does
    monkeypatch.setattr(selection, "given_or_ray", lambda given=None: asked.append(1) or given or LocalExecutor())
    for engine in ("local", "ray"):
        sel = SelectionConfig(name=engine, engine=engine, block_rows=300, clip=CLIP, dedup={"url": True})
        write_selection(str(run), sel)
        assert bool(asked) == (engine == "ray")
    a, b = run / "selections" / "local", run / "selections" / "ray"
    same_selection(a, b)
    rep = json.loads((b / "report.json").read_text())
    assert rep["sweep"]["per_group"]["by"] == "language" and rep["flips"]["rows"] > 0
    assert rep["tradeoff"]["column"] == "language" and rep["tradeoff"]["points"]
    html = (b / "report.html").read_text()
    assert "Per-group thresholds by language" in html and "en 0.28, de 0.25 at the selection" in html
    # the boundary gallery: each row above or below its own language's threshold
    for g in rep["gallery"]["groups"]:
        t = float(np.float32(CLIP["thresholds"].get(g["value"], CLIP["min_score"])))
        assert all(r["clip_score"] >= t for r in g["above"]) and all(r["clip_score"] < t for r in g["below"])
        assert g["above"] or g["below"]
    assert rep["gallery"]["per_group"] == {"by": "language", "thresholds": CLIP["thresholds"]}
    assert "Boundary gallery (threshold 0.260; per language: en 0.280, de 0.250, by language)" in html  # all shown


def test_on_real_ray_the_same_selection(run_dir, tmp_path, ray_session):
    """The same comparison with the Ray engine's tasks on Ray itself (the session's local cluster)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for engine in ("local", "ray"):
        sel = SelectionConfig(name=engine, engine=engine, block_rows=300, clip=CLIP, dedup={"url": True})
        write_selection(str(run), sel)
    same_selection(run / "selections" / "local", run / "selections" / "ray")
