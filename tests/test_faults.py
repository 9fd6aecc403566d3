"""Fault tolerance, each checked against a clean run of the same input (tests/fault_support.py
assert_same_outcome): every input row decided exactly once, no duplicate uid, the same kept uid
set, rows, decisions, scores and annotations.

- a scoring actor that dies (os._exit) in its first window before writing anything, and one that
  dies right after writing a window's scores: Ray restarts it and redoes the call; the redo of a
  scored window finds it scored (curate/faults.py failpoints, forwarded to the session's
  Ray workers)
- the worker node that hosts the scoring actor removed without grace from a local three-node
  cluster at 40% of the shards (tests/cluster_node_kill.py, in a subprocess: a Cluster cannot
  share this process with the session's Ray); the actor needs the custom resource `accel`, which
  only the two worker nodes have
- a killed driver, `curate run --address` and the Ray Jobs API: tests/test_cluster_jobs.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curate import faults
from curate.config import SpecError, load_spec, parse_spec
from curate.presets import preset_path
from curate.runner import run
import polars as pl

from fault_support import (
    REPO,
    SHARDS,
    annotations_frame,
    assert_same_outcome,
    child_env,
    demo_inputs,
    demo_servers,
    run_in_session,
    short_tmp,
    slow_down,
    spec_overrides,
)


def _spec(base: Path, out: Path, **extra):
    return load_spec(preset_path("demo")).with_overrides(**spec_overrides(base, out), **extra)


def test_scorer_resources_are_typed():
    base = {"name": "t", "input": {"paths": ["x.parquet"]}}
    assert parse_spec({**base, "ray": {"scorer_resources": {"accel": 1}}}).ray.scorer_resources == {"accel": 1.0}
    for bad, says in (
        ({"GPU": 1}, "'GPU' is not a custom resource"),
        ({"accel": 0}, "accel = 0.0 must be > 0"),
        ({"accel": "many"}, "ray.scorer_resources.accel"),
    ):
        with pytest.raises(SpecError, match=says):
            parse_spec({**base, "ray": {"scorer_resources": bad}})
    with pytest.raises(SpecError, match="ray.scorer_resource: Extra inputs are not permitted"):
        parse_spec({**base, "ray": {"scorer_resource": {"accel": 1}}})


def test_failpoint_fires_once_and_is_checked(tmp_path, monkeypatch):
    once = tmp_path / "once"
    env = {**os.environ, faults.ENV: f"score_first_batch:{once}"}
    code = "from curate import faults; faults.fire('score_after_write'); faults.fire('score_first_batch', 'part-7'); print('went on')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == faults.FAILPOINT_EXIT_CODE and "went on" not in first.stdout
    assert json.loads(once.read_text())["detail"] == "part-7"
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "went on" in again.stdout
    monkeypatch.setenv(faults.ENV, "score_frist_batch:/tmp/x")
    with pytest.raises(ValueError, match="score_frist_batch"):
        faults.forwarded_env()
    monkeypatch.delenv(faults.ENV)
    assert faults.forwarded_env() == {}
    faults.fire("score_first_batch")  # unset: a no-op


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    base = tmp_path_factory.mktemp("faults")
    with demo_servers() as servers:
        truth = demo_inputs(base, servers)
        ref = base / "reference"
        res = run(_spec(base, ref))
        assert res.ok and len(res.shards_done) == SHARDS, res.failed
        yield {"base": base, "servers": servers, "truth": truth, "ref": ref}


def _once(path: Path) -> dict:
    assert path.exists(), f"failpoint {path.name} never fired"
    return json.loads(path.read_text())


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_scoring_actor_crashes_are_redone_exactly_once(world, tmp_path, monkeypatch):
    first, after = tmp_path / "score_first_batch.once", tmp_path / "score_after_write.once"
    monkeypatch.setenv("CURATE_FAILPOINT", f"score_first_batch:{first},score_after_write:{after}")
    out = tmp_path / "run"
    res = run(_spec(world["base"], out))
    assert res.ok and len(res.shards_done) == SHARDS, res.failed

    crash1, crash2 = _once(first), _once(after)
    assert _dead(crash1["pid"]) and _dead(crash2["pid"]) and crash1["pid"] != crash2["pid"]
    ann = out / "annotations"
    # crash 1 hit before anything of its window was written: the window was scored again afterwards
    m1 = ann / f"{crash1['detail']}.done"
    assert m1.stat().st_mtime_ns > first.stat().st_mtime_ns
    # crash 2 hit after its window's scores were written: the retried call found them and scored
    # nothing again (the manifest counts such calls per shard), and the shard finished after it
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert shards[crash2["detail"]].get("windows_reused") == 1, shards[crash2["detail"]]
    assert sum(s.get("windows_reused", 0) for s in shards.values()) == 1
    assert (ann / f"{crash2['detail']}.done").stat().st_mtime_ns > after.stat().st_mtime_ns
    assert not list((out / "_work").rglob("*"))  # nothing of a shard in flight is left
    assert_same_outcome(out, world["ref"], world["truth"])


@pytest.mark.slow
def test_scoring_node_removed_at_40_percent(world, tmp_path):
    servers, truth = world["servers"], world["truth"]
    out = tmp_path / "run"
    spec_file, result_file = tmp_path / "spec.json", tmp_path / "result.json"
    spec_file.write_text(_spec(world["base"], out).model_dump_json())
    slow_down(servers, truth, lambda k: 0.3 * k)  # later shards still in flight at 40%
    cmd = [sys.executable, str(REPO / "tests" / "cluster_node_kill.py"), str(spec_file), str(result_file)]
    ray_tmp = short_tmp("crc")
    try:
        res = run_in_session(cmd, child_env(ray_tmp), 400, cwd=REPO, merge_stderr=True)
    finally:
        slow_down(servers, truth, lambda k: 0.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-4000:]
    info = json.loads(result_file.read_text())
    print(
        f"node-kill run: {info['seconds']}s, cluster up in {info['cluster_up_s']}s, node removed after {info['kill_after_s']}s"
    )

    # the custom resource placed the scoring actor on an accel node, never on the head (which
    # has free CPUs and is the driver's own node, where Ray would otherwise put it)
    m = json.loads((out / "manifest.json").read_text())
    assert m["cluster"]["scorer_nodes"][0] in info["accel_nodes"] and info["head"] not in m["cluster"]["scorer_nodes"]
    # that node was removed while work was in flight, and the run finished on the others
    assert info["killed"] == m["cluster"]["scorer_nodes"][0]
    assert info["killed"] not in info["alive_nodes"] and len(info["alive_nodes"]) == 2
    assert 0.4 * SHARDS <= len(info["done_at_kill"]) < SHARDS, info["done_at_kill"]
    assert info["ok"] and len(info["shards_done"]) == SHARDS, info["failed"]
    assert m["state"] == "complete" and m["counts"]["shards_complete"] == SHARDS
    assert_same_outcome(out, world["ref"], truth)


@pytest.mark.slow
def test_a_poison_shard_fails_alone(world, tmp_path, monkeypatch):
    """A shard that kills its scoring actor on every try (restarts set to 0, so each crash kills
    the actor for good) fails by name after its resubmissions; a fresh actor replaces each dead
    one, and every other shard -- including calls the dead actors took down -- completes."""
    monkeypatch.setenv("CURATE_FAILPOINT", "score_poison:part-00003")
    out = tmp_path / "run"
    res = run(_spec(world["base"], out, **{"ray.scorer_max_restarts": 0}))
    assert list(res.failed) == ["part-00003"], res.failed
    assert "died on all 3 tries" in res.failed["part-00003"]
    assert sorted(res.shards_done) == [f"part-{k:05d}" for k in range(SHARDS) if k != 3]
    m = json.loads((out / "manifest.json").read_text())
    assert m["state"] == "failed" and m["cluster"]["scorer_replacements"] == 3
    assert m["unaccounted_rows"] == {"part-00003": 20}
    got = annotations_frame(out)
    ref = annotations_frame(world["ref"]).filter(pl.col("shard") != "part-00003")
    assert got.equals(ref)  # the other shards were scored exactly as in a clean run
