"""DataComp participants start from metadata: the datacomp presets select on the pool's own
columns (similarity scores, original sizes) with no fetch and no model, on real Ray."""

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from engine_support import same_selection

from curate.executor import LocalExecutor
from curate.config import load_spec
from curate.presets import preset_path
from curate.runner import run

N = 2000


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(3)
    words = ["a", "photo", "of", "the", "red", "dog", "on", "grass", "near", "house"]
    for s in range(2):
        n = N // 2
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 8)))) for _ in range(n)]
        urls = [f"https://img{s}.example.com/{i}.jpg" for i in range(n)]
        pl.DataFrame(
            {
                "uid": [hashlib.md5(f"{s}-{i}".encode()).hexdigest() for i in range(n)],
                "url": urls,
                "text": texts,
                "original_width": rng.integers(50, 1200, n).astype(np.int64),
                "original_height": rng.integers(50, 1200, n).astype(np.int64),
                "clip_l14_similarity_score": rng.normal(0.25, 0.06, n).astype(np.float32),
            }
        ).write_parquet(d / f"{s:08d}.parquet")
    return d


def _decisions(out):
    sel = out / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed")


def test_clip_score_preset_keeps_datacomps_top_fraction_from_metadata(pool, tmp_path):
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(tmp_path / "run")}
    )
    result = run(spec, executor=LocalExecutor())
    assert result.ok
    d = _decisions(tmp_path / "run")
    assert d.height == N
    assert set(d["fetch_status"]) == {"not_needed"}  # nothing fetched
    assert set(d["clip_model"]) == {"input-column:clip_l14_similarity_score"}
    # datacomp baselines: n = int(len * fraction); threshold = -np.sort(-scores)[n]; keep >= threshold
    scores = pl.read_parquet(pool / "*.parquet")["clip_l14_similarity_score"].to_numpy()
    threshold = -np.sort(-scores)[int(len(scores) * 0.3)]
    expected = set(pl.read_parquet(pool / "*.parquet").filter(pl.col("clip_l14_similarity_score") >= threshold)["uid"])
    assert set(d.filter(pl.col("kept"))["uid"]) == expected
    uids = np.load(tmp_path / "run" / "selections" / "default" / "uids.npy")
    assert len(uids) == len(expected)


def test_basic_preset_filters_on_metadata_sizes_and_captions(pool, tmp_path):
    spec = load_spec(preset_path("datacomp_basic")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(tmp_path / "run"), "selection.language.allow": []}
    )
    assert run(spec, executor=LocalExecutor()).ok
    d = _decisions(tmp_path / "run")
    lo = np.minimum(d["original_width"].to_numpy(), d["original_height"].to_numpy())
    hi = np.maximum(d["original_width"].to_numpy(), d["original_height"].to_numpy())
    words = d["caption"].str.split(" ").list.len().to_numpy()
    chars = d["caption"].str.len_chars().to_numpy()
    should_keep = (lo >= 200) & (hi / lo <= 3.0) & (words > 2) & (chars > 5)
    assert d["kept"].to_numpy().tolist() == should_keep.tolist()
    assert set(d.filter(~pl.col("kept"))["reason"]) <= {"caption_length", "image_size"}


@pytest.mark.parametrize("clip", [{"top_fraction": 0.3}, {"min_score": 0.27}])
def test_the_ray_engine_writes_thesame_selection(pool, tmp_path, clip, ray_session, monkeypatch):
    """selection.engine = "ray" (the top fraction ranked shard by shard on Ray, the dedup candidate
    steps as tasks) against "local", on one run: the same kept and removed rows, uids.npy bytes and
    report numbers, for a top fraction and for an absolute threshold."""
    from curate import selection
    from curate.config import SelectionConfig
    from curate.selection import write_selection

    ranked = []
    real = selection.top_fraction_threshold
    monkeypatch.setattr(selection, "top_fraction_threshold", lambda *a: ranked.append(type(a[-1]).__name__) or real(*a))

    out = tmp_path / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    rules = {"clip": clip, "dedup": {"url": True, "caption_exact": True}}
    for engine in ("local", "ray"):
        write_selection(str(out), SelectionConfig.model_validate({**rules, "name": engine, "engine": engine}))
    sel = out / "selections"
    same_selection(sel / "local", sel / "ray")
    removed = pl.read_parquet(sel / "ray" / "removed" / "*.parquet")
    assert (removed["reason"] == "duplicate_caption_exact").sum() > 0  # the dedup had work to do
    assert json.loads((sel / "ray" / "selection.json").read_text())["rules"]["engine"] == "ray"
    assert ranked == (["RayExecutor"] if "top_fraction" in clip else [])  # ranked on Ray, by shard
    selection.rebuild_report(str(out), "ray")  # `curate report` re-ranks on Ray too, to the same numbers
    assert ranked == (["RayExecutor"] * 2 if "top_fraction" in clip else [])
    same_selection(sel / "local", sel / "ray")


def test_what_a_selection_writes_is_a_setting(pool, tmp_path):
    """selection.write: full copies of kept and removed rows, kept rows with removed decisions, or
    decisions only. The same decisions and uids either way; every row in exactly one file; `curate
    diff` reads all three (group columns from the annotations where the files lack them)."""
    from curate.config import SelectionConfig
    from curate.reports.diff import diff
    from curate.selection import DECISION_COLUMNS, write_selection

    out = tmp_path / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    rules = {"clip": {"top_fraction": 0.3}, "dedup": {"url": True, "caption_exact": True}}
    for mode in ("full", "kept", "decisions"):
        write_selection(str(out), SelectionConfig.model_validate({**rules, "name": mode, "write": mode}))
    sel = out / "selections"
    folders = {m: sorted(p.name for p in (sel / m).iterdir() if p.is_dir()) for m in ("full", "kept", "decisions")}
    assert folders == {
        "full": ["kept", "removed", "tables"],
        "kept": ["kept", "removed", "tables"],
        "decisions": ["decisions", "tables"],
    }
    full_removed = pl.read_parquet(sel / "full" / "removed" / "*.parquet")
    assert "caption" in full_removed.columns
    assert pl.read_parquet(sel / "kept" / "removed" / "*.parquet").columns == DECISION_COLUMNS
    assert pl.read_parquet(sel / "kept" / "kept" / "*.parquet").equals(
        pl.read_parquet(sel / "full" / "kept" / "*.parquet")
    )
    dec = pl.read_parquet(sel / "decisions" / "decisions" / "*.parquet")
    assert dec.columns == DECISION_COLUMNS and dec.height == N and dec.select("shard", "row").n_unique() == N
    want = full_removed.select(DECISION_COLUMNS).sort("shard", "row")
    assert dec.filter(~pl.col("kept")).sort("shard", "row").equals(want)
    assert (dec["reason"] == "duplicate_caption_exact").sum() > 0
    uids = {m: (sel / m / "uids.npy").read_bytes() for m in folders}
    assert uids["full"] == uids["kept"] == uids["decisions"]
    counts = {m: json.loads((sel / m / "selection.json").read_text())["shards"] for m in folders}
    assert counts["full"] == counts["kept"] == counts["decisions"]
    for other in ("kept", "decisions"):
        d = diff(str(sel / "full"), str(sel / other), group_columns=("domain", "language"))
        assert d["kept_a"] == d["kept_b"] == d["kept_both"] == dec["kept"].sum()
        for c in ("domain", "language"):  # group columns read back the same: retention equal per group
            groups = d["groups"][c]
            assert groups and all(g["rows_a"] == g["rows_b"] and g["change"] == 0 for g in groups), groups
            assert "(unknown)" not in {g["value"] for g in groups}
    # a selection folder copied away from its run still diffs: what its files lack is unknown
    import shutil

    away = tmp_path / "away"
    for mode in ("full", "decisions"):
        shutil.copytree(sel / mode, away / mode)
    d = diff(str(away / "full"), str(away / "decisions"), group_columns=("domain",))
    assert d["kept_a"] == d["kept_b"] == d["kept_both"] == dec["kept"].sum()
    assert {g["value"] for g in d["groups"]["domain"]} >= {"(unknown)"}  # b has no domain column away from its run


def test_select_takes_the_engine_and_what_to_write_on_the_command_line(pool, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    out = tmp_path / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    cli = CliRunner()
    res = cli.invoke(app, ["select", str(out), "--name", "slim", "--write", "decisions", "--engine", "local"])
    assert res.exit_code == 0, res.output
    rules = json.loads((out / "selections" / "slim" / "selection.json").read_text())["rules"]
    assert rules["write"] == "decisions" and rules["engine"] == "local"
    assert (out / "selections" / "slim" / "decisions").is_dir()
    bad = cli.invoke(app, ["select", str(out), "--name", "x", "--write", "everything"])
    assert bad.exit_code != 0 and "write" in bad.output and "full" in bad.output, bad.output
    assert not (out / "selections" / "x").exists()


def test_a_worker_killed_while_ranking_gives_thesame_selection(pool, tmp_path, ray_session, monkeypatch):
    """A Ray worker dies (os._exit) with its shard's counts for the top-fraction ranking: Ray
    redoes the task, and the selection is the local engine's, row for row and byte for byte."""
    from curate.config import SelectionConfig
    from curate.selection import write_selection

    out = tmp_path / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(pool)], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    rules = {"clip": {"top_fraction": 0.3}, "dedup": {"url": True, "caption_exact": True}}
    write_selection(str(out), SelectionConfig.model_validate({**rules, "name": "local"}))
    once = tmp_path / "rank_counts.once"
    monkeypatch.setenv("CURATE_FAILPOINT", f"rank_counts:{once}")
    write_selection(str(out), SelectionConfig.model_validate({**rules, "name": "ray", "engine": "ray"}))
    died = json.loads(once.read_text())
    assert died["failpoint"] == "rank_counts" and died["detail"].startswith("0000")  # a shard's task died
    same_selection(out / "selections" / "local", out / "selections" / "ray")
