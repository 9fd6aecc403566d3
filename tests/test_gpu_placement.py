"""GPU placement by construction: on a cluster that reports GPUs each scoring actor asks for one
(`gpus_per_scorer`), Ray gives each its own GPU id and sets CUDA_VISIBLE_DEVICES to it, and the
scorer's device choice (curate.model.choose_device) puts the model on that GPU, as cuda:0 of the
actor's process; an actor Ray gave no GPU stays on the CPU even on a GPU node.

The cluster is a real local Ray with two fake GPUs (`ray.init(num_gpus=2)`) in a driver subprocess
of its own (the test session may hold another Ray). torch has no CUDA here, so the model itself
loads on the CPU; what the choice would be with CUDA is asked of choose_device() inside each actor
with the GPU ids Ray assigned it."""

from __future__ import annotations


import pytest
import torch

from curate import model
from curate import ray_adapter as rx
from fault_support import driver_result


@pytest.mark.parametrize(
    "gpu_ids, cuda, expected",
    [
        (["1"], True, "cuda:0"),  # Ray's CUDA_VISIBLE_DEVICES=1: the process sees it as device 0
        (["0", "1"], True, "cuda:0"),
        ([], True, "cpu"),  # a Ray actor given no GPU never takes one, even where CUDA works
        (["0"], False, "cpu"),  # Ray gave a GPU, but torch has no CUDA (no driver, CPU-only build)
        (None, True, "cuda:0"),  # outside Ray: CUDA if it works
        (None, False, "cpu"),
    ],
)
def test_choose_device(gpu_ids, cuda, expected):
    assert model.choose_device(gpu_ids, cuda) == torch.device(expected)


def test_resolve_device_reads_the_ids_the_adapter_records(monkeypatch):
    assert rx.GPU_IDS_ENV == model.RAY_GPU_IDS_ENV
    monkeypatch.delenv(model.RAY_GPU_IDS_ENV, raising=False)
    assert model.assigned_gpu_ids() is None
    monkeypatch.setenv(model.RAY_GPU_IDS_ENV, "")
    assert model.assigned_gpu_ids() == []
    assert model.resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv(model.RAY_GPU_IDS_ENV, "3")
    assert model.assigned_gpu_ids() == ["3"]
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert model.resolve_device(None) == torch.device(expected)
    assert model.resolve_device("cpu") == torch.device("cpu")  # an explicit device wins


def test_gpus_per_scorer_follows_the_cluster():
    assert rx.gpus_per_scorer(rx.ClusterInfo(None, cpus=8, gpus=2, nodes=1)) == 1.0
    assert rx.gpus_per_scorer(rx.ClusterInfo(None, cpus=8, gpus=0, nodes=1)) == 0.0


DRIVER = r'''
import json, os
import ray
from curate import ray_adapter as rx
from curate.config import PipelineSpec, RayConfig
from curate.executor import Resources
from curate.runner import scorer_resources
from curate.shard_jobs import ShardScorer

def inside(scorer):
    """What a scoring actor sees: run in the actor through __ray_call__."""
    import torch
    from curate import model
    ids = model.assigned_gpu_ids()
    return {
        "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "recorded_gpu_ids": ids,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "choice_with_cuda": str(model.choose_device(ids, True)),
        "cuda_available": torch.cuda.is_available(),
        "model_device": str(scorer.scorer.clip.device),
    }

ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False)
out = {}
try:
    info = rx.connect(RayConfig())  # joins the Ray this process has, as the runner's connect() would
    out["info"] = info.as_dict()
    spec = PipelineSpec.model_validate({"name": "t", "input": {"paths": ["x.parquet"]}})
    spec_json = spec.model_dump_json()
    # the resources the runner declares for each scoring actor on this cluster
    pool = rx.RayActorPool(ShardScorer, (spec_json,), size=2, resources=scorer_resources(spec, info))
    out["gpu_pool"] = {
        "placement": pool.placement(),
        "inside": ray.get([a.__ray_call__.remote(inside) for a in pool.actors]),
        "describe": pool.call_all("describe"),
        "gpus_left": ray.available_resources().get("GPU", 0.0),
    }
    # the same node, an actor that asked for no GPU (what the runner does on a cluster without GPUs)
    cpu_pool = rx.RayActorPool(ShardScorer, (spec_json,), size=1, resources=Resources(cpus=1, gpus=0))
    out["cpu_pool"] = {
        "placement": cpu_pool.placement(),
        "inside": ray.get([a.__ray_call__.remote(inside) for a in cpu_pool.actors]),
    }
    pool.close()
    cpu_pool.close()
finally:
    ray.shutdown()
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture(scope="module")
def fake_gpu_run() -> dict:
    return driver_result(DRIVER, drop_env=(model.RAY_GPU_IDS_ENV,), timeout=300)


def test_each_scoring_actor_gets_its_own_gpu(fake_gpu_run):
    assert fake_gpu_run["info"]["gpus"] == 2.0
    gpu = fake_gpu_run["gpu_pool"]
    ids = [p["gpu_ids"] for p in gpu["placement"]]
    assert all(len(i) == 1 for i in ids), ids
    assert sorted(i[0] for i in ids) == ["0", "1"]  # distinct: one GPU each
    for p in gpu["placement"]:
        assert p["resources"].get("GPU") == 1.0, p  # the actor asked for num_gpus=1
    assert gpu["gpus_left"] == 0.0  # both GPUs held by the two actors


def test_the_scorer_chooses_the_gpu_ray_assigned(fake_gpu_run):
    for p, inside in zip(fake_gpu_run["gpu_pool"]["placement"], fake_gpu_run["gpu_pool"]["inside"]):
        assert inside["ray_gpu_ids"] == p["gpu_ids"]
        assert inside["recorded_gpu_ids"] == p["gpu_ids"]  # recorded before ShardScorer.__init__ ran
        assert inside["cuda_visible_devices"] == p["gpu_ids"][0]  # Ray pinned the process to it
        assert inside["choice_with_cuda"] == "cuda:0"  # that GPU, as the process's device 0
        # no CUDA in this test environment: the model really loaded on the CPU
        assert inside["cuda_available"] is False and inside["model_device"] == "cpu"
    assert [d["device"] for d in fake_gpu_run["gpu_pool"]["describe"]] == ["cpu", "cpu"]


def test_an_actor_without_a_gpu_stays_on_the_cpu_on_a_gpu_node(fake_gpu_run):
    cpu = fake_gpu_run["cpu_pool"]
    assert cpu["placement"][0]["gpu_ids"] == []
    assert "GPU" not in cpu["placement"][0]["resources"]
    inside = cpu["inside"][0]
    assert inside["recorded_gpu_ids"] == []
    assert inside["choice_with_cuda"] == "cpu"  # even if this node's CUDA worked
