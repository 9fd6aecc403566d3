"""The cluster templates parse and have the shape the docs promise (they cannot be launched here)."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def test_aws_launcher_config_separates_head_fetch_and_gpu_workers():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert types["gpu_workers"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["fetch_workers"]["resources"]
    for t in types.values():  # S3 by instance role, never keys
        assert "IamInstanceProfile" in t["node_config"]
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()


def test_kuberay_job_runs_curate_with_gpu_scoring_group():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("curate run ")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["score"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
