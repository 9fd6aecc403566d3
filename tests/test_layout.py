"""Scoring sized to the node (curate/layout.py): the layout resolved from node resources (a 2-CPU
node, a 16-CPU node, a node with fake GPUs), explicit settings winning, no layout that can leave a
prepare task waiting forever (tested for real with score.actors = the node's CPUs), and a run whose
work cannot be placed saying so."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import polars as pl
import pytest
from typer.testing import CliRunner

from curate import runner
from curate.cli import app
from curate.config import ScoreConfig, load_spec
from curate.demo import synthetic
from curate.demo.image_server import ImageServer
from curate.executor import ClusterInfo, LocalExecutor, Resources
from curate.layout import resolve
from curate.presets import preset_path
from curate.runner import RunResult, ShardScheduler, ShardSteps

AUTO = ScoreConfig()


def node(cpus: float, gpus: float = 0, nodes: int = 1) -> ClusterInfo:
    return ClusterInfo(None, cpus=cpus, gpus=gpus, nodes=nodes)


def test_a_2_cpu_node_gives_one_actor_both_cores_and_keeps_a_cpu_for_fetch():
    lay = resolve(AUTO, node(2))
    assert (lay.actors, lay.model_threads, lay.actor_cpus, lay.actor_gpus) == (2, 1, 0.5, 0.0)
    assert lay.prepare_cpus == 1.0 and lay.decode_threads == 0  # inline: each actor has one core
    assert lay.window_rows == 128  # scoring starts after a window of rows is fetched, not a shard


def test_a_16_cpu_node_uses_its_cores_for_the_model_and_keeps_an_eighth_for_prepare():
    lay = resolve(AUTO, node(16))
    assert (lay.actors, lay.model_threads, lay.decode_threads, lay.actor_cpus) == (8, 2, 0, 1.75)
    assert 16 - 8 * lay.actor_cpus == 2  # two prepare tasks (fetch, resize) overlap scoring
    big = resolve(AUTO, node(64))  # at most 8 actors a node; more cores make them multi-threaded
    assert (big.actors, big.model_threads, big.decode_threads) == (8, 6, 2)


def test_a_node_with_gpus_gets_one_actor_per_gpu_and_decode_threads_to_feed_it():
    lay = resolve(AUTO, node(16, gpus=2))
    assert (lay.actors, lay.actor_gpus, lay.model_threads) == (2, 1.0, 1)
    assert lay.decode_threads == 7 and lay.actor_cpus == 7  # (16 - 2 kept for prepare) / 2 GPUs
    big = resolve(AUTO, node(96, gpus=8))
    assert big.actors == 8 and big.decode_threads == 8  # capped: more decode than one GPU can take is waste
    assert lay.window_rows == big.window_rows == 2048  # about a second of a GPU's scoring per call
    small = resolve(AUTO, node(4, gpus=8))  # fewer cores than GPUs: fractions, never a hang
    assert small.actors == 8 and small.actor_cpus * 8 + small.prepare_cpus <= 4


def test_several_cpu_nodes_get_one_actor_each():
    lay = resolve(AUTO, node(64, nodes=4))
    assert (lay.actors, lay.model_threads, lay.cpus_per_node) == (32, 2, 16.0)


def test_a_mixed_cluster_sizes_actors_for_the_nodes_that_hold_them():
    """As cluster/aws.yaml builds it: a head with no CPU, CPU fetch nodes, GPU nodes with few cores.
    The GPU actors ask only what a GPU node has; the head does not count as a node to score on."""
    shapes = ((0.0, 0.0), (16.0, 0.0), (16.0, 0.0), (4.0, 1.0), (4.0, 1.0))
    lay = resolve(AUTO, ClusterInfo(None, cpus=40, gpus=2, nodes=5, node_shapes=shapes))
    assert (lay.actors, lay.actor_gpus, lay.nodes) == (2, 1.0, 2)
    assert lay.actor_cpus <= 4 - 1 and lay.decode_threads == 3  # 4 cores, one kept for prepare
    cpu_only = ((0.0, 0.0), (8.0, 0.0), (16.0, 0.0))
    lay = resolve(AUTO, ClusterInfo(None, cpus=24, gpus=0, nodes=3, node_shapes=cpu_only))
    assert lay.actors == 16 and lay.model_threads == 1 and 8 * lay.actor_cpus + 1 <= 8  # fits the 8-CPU node


def test_explicit_settings_win():
    cfg = ScoreConfig(actors=2, cpu_threads=1, decode_threads=0)
    lay = resolve(cfg, node(16))
    assert (lay.actors, lay.model_threads, lay.decode_threads) == (2, 1, 0)
    lay = resolve(ScoreConfig(cpu_threads=4), node(16))  # threads given: the cores go to actors of 4
    assert (lay.actors, lay.model_threads) == (4, 4)
    assert resolve(ScoreConfig(window_rows=1000), node(2)).window_rows == 1000
    assert resolve(ScoreConfig(actors=3), node(8, gpus=2)).actor_gpus == pytest.approx(2 / 3)


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_no_layout_leaves_a_prepare_task_without_a_cpu(gpus):
    """Whatever the node and the actor count: the actors' reservations on a node plus one prepare
    task fit in the node's CPUs (the hang: two actors holding both CPUs of a 2-CPU node)."""
    for cpus in (1, 2, 3, 4, 8, 16, 64):
        for actors in (None, 1, 2, cpus, 2 * cpus, 4 * cpus):
            lay = resolve(ScoreConfig(actors=actors), node(cpus, gpus))
            per_node = -(-lay.actors // lay.nodes)
            assert lay.actor_cpus > 0 and lay.prepare_cpus > 0
            assert per_node * lay.actor_cpus + lay.prepare_cpus <= cpus + 1e-9, (cpus, actors, gpus, lay)


def test_show_spec_prints_the_layout_on_this_machine():
    res = CliRunner().invoke(app, ["show-spec", "demo"])
    assert res.exit_code == 0, res.output
    assert "layout on this machine" in res.output and "scoring actor(s)" in res.output


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    base = tmp_path_factory.mktemp("layout")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ImageServer("127.0.0.1"))
        (base / "in").mkdir()
        for k in range(2):
            rows = []
            for i in range(8):
                a = synthetic.random_attrs(10 * k + i)
                server.add(f"/img/{k}-{i}.jpg", synthetic.to_jpeg(synthetic.render(a, i, 96, 96)))
                rows.append({"URL": server.url(f"/img/{k}-{i}.jpg"), "TEXT": synthetic.caption(a, "en", i)})
            pl.DataFrame(rows).with_columns(pl.lit("s").alias("site")).write_parquet(base / "in" / f"part-{k}.parquet")
        yield base


def test_as_many_actors_as_cpus_still_runs_on_ray(small_input, ray_session):
    """score.actors = the node's CPUs (2 here) hung forever before: both actors held both CPUs and
    the shards' prepare tasks could never start. Now the actors reserve fractions."""
    cpus = int(ray_session.cluster_resources()["CPU"])
    spec = load_spec(preset_path("demo")).with_overrides(
        **{
            "input.paths": [str(small_input / "in")],
            "output.dir": str(small_input / "run"),
            "score.actors": cpus,
            "score.cpu_threads": 1,
        }
    )
    res = runner.run(spec)
    assert res.ok and sorted(res.shards_done) == ["part-0", "part-1"]
    m = json.loads((small_input / "run" / "manifest.json").read_text())
    lay = m["layout"]
    assert lay["actors"] == cpus and lay["actor_cpus"] * cpus + lay["prepare"]["cpus"] <= cpus
    assert len(m["cluster"]["scorer_placement"]) == cpus


def test_work_that_waits_says_so(monkeypatch, caplog):
    """A run whose work makes no progress for STALL_S says what waits and what is free."""
    monkeypatch.setattr(runner, "STALL_S", 0.3)

    def slow_prepare(path: str, spec_json: str, run_dir: str) -> dict:
        time.sleep(1.0)
        return {"shard": path, "state": "done", "rows": 1}

    caplog.set_level(logging.WARNING, logger="curate.runner")
    steps = ShardSteps(slow_prepare, fetch=None, finish=None)  # type: ignore[arg-type]  # never reached
    sched = ShardScheduler(LocalExecutor(), steps, None, "{}", "rd", {}, RunResult("rd"), prepare_resources=Resources())
    sched.run(["a"])
    assert any("no progress for" in r.message and "free now" in r.message for r in caplog.records), caplog.text
