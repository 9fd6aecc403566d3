"""decide() on the cluster (curate/distributed_decide.py) against the in-process engine: the same
decision columns for every row, whatever the blocks and partitions, with duplicate chains that
need following, NaN and null scores, repeated uids and every survivor rule."""

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from engine_support import report_numbers, same_report, same_selection

from curate import annotations
from curate import distributed_decide as dd
from curate.block_shuffle import PARTITION_ROWS, Plan, plan_blocks
from curate.config import SelectionConfig, load_spec
from curate.executor import LocalExecutor
from curate.filters.decide import decide
from curate.presets import preset_path
from curate.runner import run

N = 400  # rows per shard, 4 shards


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dd")
    rng = np.random.default_rng(3)
    words = ["a", "photo", "of", "the", "red", "dog", "on", "grass", "near", "house"]
    for s in range(4):
        pl.DataFrame(
            {
                "uid": [hashlib.md5(f"{s}-{i}".encode()).hexdigest() for i in range(N)],
                # few hosts and paths: many URL duplicates, across shards
                "url": [f"https://img{rng.integers(0, 3)}.example.com/{rng.integers(0, 300)}.jpg" for _ in range(N)],
                "text": [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(N)],
                "original_width": rng.integers(50, 1200, N),
                "original_height": rng.integers(50, 1200, N),
                "clip_l14_similarity_score": rng.normal(0.25, 0.06, N).astype(np.float32),
            }
        ).write_parquet(d / f"{s:08d}.parquet")
    out = d / "run"
    spec = load_spec(preset_path("datacomp_clip_score")).with_overrides(
        **{"input.paths": [str(d)], "output.dir": str(out)}
    )
    assert run(spec, executor=LocalExecutor()).ok
    # what a metadata run lacks: image hashes (so exact image dedup has work), NaN and null scores,
    # and a uid repeated across shards
    for p in sorted((out / "annotations").glob("*.parquet")):
        f = pl.read_parquet(p)
        sha = [f"{int(x):064x}" if x < 250 else None for x in rng.integers(0, 400, f.height)]
        score = f["clip_score"].to_numpy().copy()
        score[rng.random(f.height) < 0.03] = np.nan
        f.with_columns(
            pl.Series("image_sha256", sha),
            pl.when(pl.col("row") % 37 == 5)
            .then(None)
            .otherwise(pl.Series(score))
            .cast(pl.Float32)
            .alias("clip_score"),
            pl.when(pl.col("row") % 53 == 7).then(pl.lit("0" * 32)).otherwise(pl.col("uid")).alias("uid"),
        ).write_parquet(p)
    return str(out)


RULES = {
    "url-caption": {"clip": {"min_score": 0.22}, "dedup": {"url": True, "caption_exact": True}},
    "first": {"clip": {"top_fraction": 0.5}, "dedup": {"url": True, "caption_exact": True, "survivor": "first"}},
    "priority": {
        "clip": {"min_score": 0.2},
        "dedup": {"url": True, "caption_exact": True, "survivor": "priority", "survivor_column": "original_width"},
    },
    "url-image": {"clip": {}, "dedup": {"url": True, "image_sha256": True, "caption_exact": False}},
}


def _local(run_dir, sel):
    frame, resolved = decide(annotations.scan(run_dir), sel)
    return frame.collect().sort("shard", "row"), resolved.clip_threshold


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("rows_per_block,partitions", [(10**9, 0), (500, 0), (500, 3), (900, 2)])
def test_the_same_decisions_as_the_local_engine(run_dir, name, rows_per_block, partitions):
    rules = RULES[name]
    sel = SelectionConfig.model_validate({**rules, "dedup": {**rules["dedup"], "partitions": partitions}})
    want, threshold = _local(run_dir, sel)
    shards = annotations.completed_shards(run_dir)
    got = dd.decide_on_ray(run_dir, shards, sel, threshold, LocalExecutor(), rows_per_block=rows_per_block)
    assert got.sort("shard", "row").equals(want)
    reasons = set(want["reason"].drop_nulls())
    assert {"duplicate_url", "duplicate_uid"} <= reasons  # the dedups had work to do
    assert want["duplicate_cluster"].drop_nulls().len() > 0


def test_duplicates_follow_their_survivor_to_the_kept_copy(run_dir, monkeypatch):
    """The chains are there (a URL duplicate whose survivor then lost the image dedup), the rounds
    re-point them, and without the rounds the decisions would differ: the test above would see it."""
    sel = SelectionConfig.model_validate(RULES["url-image"])
    want, threshold = _local(run_dir, sel)
    shards = annotations.completed_shards(run_dir)
    answered = []
    real = dd.apply_answers
    monkeypatch.setattr(dd, "apply_answers", lambda *a: answered.append(r := real(*a)) or r)
    dd.decide_on_ray(run_dir, shards, sel, threshold, LocalExecutor(), rows_per_block=500)
    assert sum(r[1] for r in answered) > 0
    monkeypatch.setattr(dd, "apply_answers", lambda state, *a: (state, 0))
    unfollowed = dd.decide_on_ray(run_dir, shards, sel, threshold, LocalExecutor(), rows_per_block=500)
    assert not unfollowed.sort("shard", "row").equals(want)
    kept = set(want.filter(pl.col("kept"))["uid"])
    pointers = want.filter(pl.col("reason") == "duplicate_url")["duplicate_of"]
    assert pointers.len() and set(pointers) <= kept  # every URL duplicate names a kept row


def test_blocks_follow_the_row_counts(run_dir):
    shards = annotations.completed_shards(run_dir)
    assert plan_blocks(run_dir, shards, 10**9) == (0,)
    assert plan_blocks(run_dir, shards, 800) == (0, 2)
    assert plan_blocks(run_dir, shards, 1) == (0, 1, 2, 3)  # a shard bigger than a block is one


@pytest.mark.parametrize(
    "rows,blocks,given,expected",
    [
        (1_000_000, 2, 0, 1),  # automatic: one partition per PARTITION_ROWS rows of the pool
        (10_000_000, 20, 0, 10),
        (3_000_001, 6, 0, 4),
        (10**10, 100, 0, 100),  # never more than one per block
        (10_000_000, 20, 7, 7),  # selection.dedup.partitions wins
    ],
)
def test_partitions_are_sized_by_rows_not_blocks(rows, blocks, given, expected):
    assert PARTITION_ROWS == 1_000_000
    sel = SelectionConfig.model_validate({"dedup": {"partitions": given}})
    plan = Plan("run", tuple(f"s{i}" for i in range(blocks)), tuple(range(blocks)), sel, None, rows)
    assert plan.partitions == expected


def test_on_ray_a_worker_killed_mid_shuffle_gives_the_same_decisions(run_dir, ray_session, tmp_path, monkeypatch):
    from curate.ray_adapter import RayExecutor

    sel = SelectionConfig.model_validate(RULES["url-caption"])
    want, threshold = _local(run_dir, sel)
    once = tmp_path / "shuffle.once"
    monkeypatch.setenv("CURATE_FAILPOINT", f"decide_shuffle:{once}")
    shards = annotations.completed_shards(run_dir)
    got = dd.decide_on_ray(run_dir, shards, sel, threshold, RayExecutor(), rows_per_block=500)
    assert json.loads(once.read_text())["failpoint"] == "decide_shuffle"  # a map task's worker died
    assert got.sort("shard", "row").equals(want)


@pytest.mark.parametrize("name", ["url-caption", "first"])
def test_a_whole_selection_on_ray_over_many_blocks(run_dir, name, ray_session, tmp_path, monkeypatch):
    """write_selection with engine = "ray" over 4 blocks (rows decided, files written, uids
    streamed and every report number asked of the blocks where they lie) against the local engine:
    the same files, uids.npy bytes, counts and report, also when a worker dies mid-shuffle. Then
    `curate report` re-renders it the same."""
    import shutil
    from pathlib import Path

    from curate.selection import rebuild_report, write_selection

    run = Path(tmp_path) / "run"
    shutil.copytree(run_dir, run)
    once = tmp_path / "shuffle.once"
    if name == "url-caption":
        monkeypatch.setenv("CURATE_FAILPOINT", f"decide_shuffle:{once}")
    rules = RULES[name]
    for engine in ("local", "ray"):
        spec = {**rules, "name": engine, "engine": engine, "block_rows": 400}  # 4 blocks of one shard
        write_selection(str(run), SelectionConfig.model_validate(spec))
    a, b = run / "selections" / "local", run / "selections" / "ray"
    same_selection(a, b)
    ra = report_numbers(a)
    if rules["dedup"].get("survivor", "best_score") == "best_score":  # the sweep needs it (sweep.not_sweepable)
        assert ra["sweep"] is not None and ra["gallery"]["groups"] and ra["flips"]["rows"]  # every section compared
        picked = [p for g in ra["gallery"]["groups"] for p in g["above"] + g["below"]]
        assert picked and all(p["caption"] is not None and p["url"] for p in picked)  # read by a task per shard
    if name == "url-caption":
        assert json.loads(once.read_text())["failpoint"] == "decide_shuffle"  # a worker died mid-shuffle
    rebuild_report(str(run), "ray")  # `curate report` re-asks the blocks: the same numbers
    same_report(ra, report_numbers(b))


def test_curate_sweep_follows_the_selections_engine(run_dir, ray_session, tmp_path, monkeypatch):
    """`curate sweep` of a Ray selection decides its representatives on the cluster and prints
    the same retention table as for the same rules on the local engine."""
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from curate import selection
    from curate.cli import app
    from curate.selection import write_selection

    run = Path(tmp_path) / "run"
    shutil.copytree(run_dir, run)
    rules = RULES["url-caption"]
    for engine in ("local", "ray"):
        spec = {**rules, "name": engine, "engine": engine, "block_rows": 800}
        write_selection(str(run), SelectionConfig.model_validate(spec))
    on_cluster = []
    real = selection.representatives_on
    monkeypatch.setattr(selection, "representatives_on", lambda *a, **k: on_cluster.append(a[-1]) or real(*a, **k))
    out = {}
    for name in ("local", "ray"):
        args = ["sweep", str(run), "--from", "0.1", "--to", "0.4", "--step", "0.05", "-g", "language", "-s", name]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        out[name] = res.output
    assert on_cluster == [["_score", "language"]]  # only the Ray selection's sweep ran on the cluster
    assert out["local"] == out["ray"] and "threshold" in out["ray"]
