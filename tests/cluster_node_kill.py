"""Run by tests/test_faults.py in a subprocess (a Cluster cannot share a process with the test
session's own Ray): a local three-node Ray cluster, a `curate run` on it, and the node that
hosts the scoring actor removed without grace once 40% of the shards have their marker.

    python tests/cluster_node_kill.py <spec.json> <result.json>

Nodes: the head (1 CPU, the driver's node, no accelerator), two workers with 2 CPUs and one
`accel` each, the custom resource standing in for a GPU (`ray.scorer_resources = {accel = 1}`;
`num_gpus` on a real cluster). Fetch tasks run on any CPU; the scoring actor only where `accel`
is. Writes what happened as JSON; the test checks the outputs.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path


def main(spec_file: str, result_file: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from curate.config import PipelineSpec
    from curate.runner import run

    spec = PipelineSpec.model_validate_json(Path(spec_file).read_text())
    t_start = time.time()
    # the GCS notices a lost node after health_check_failure_threshold missed checks (15 s by
    # default); faster here so the test does not wait for it
    fast_checks = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast_checks}
    )
    workers = [cluster.add_node(num_cpus=2, resources={"accel": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    spec = spec.with_overrides(**{"ray.address": cluster.address, "ray.scorer_resources": {"accel": 1}})
    out = Path(spec.output.dir)
    n_shards = len(list(Path(spec.input.paths[0]).glob("*.parquet")))
    info: dict = {
        "head": cluster.head_node.node_id,
        "accel_nodes": [w.node_id for w in workers],
        "cluster_up_s": round(time.time() - t_start, 1),
    }

    def kill_at_40_percent() -> None:
        while True:
            done = (
                sorted(p.stem for p in (out / "annotations").glob("*.done")) if (out / "annotations").exists() else []
            )
            if len(done) >= math.ceil(0.4 * n_shards):
                break
            time.sleep(0.02)
        m = json.loads((out / "manifest.json").read_text())
        scorer = m["cluster"]["scorer_nodes"][0]
        victim = next(w for w in workers if w.node_id == scorer)
        cluster.remove_node(victim, allow_graceful=False)
        info.update(killed=victim.node_id, done_at_kill=done, kill_after_s=round(time.time() - t0, 1))

    t0 = time.time()
    killer = threading.Thread(target=kill_at_40_percent, daemon=True)
    killer.start()
    result = run(spec)
    killer.join(timeout=5)
    info.update(
        ok=result.ok,
        failed=result.failed,
        shards_done=sorted(result.shards_done),
        seconds=round(time.time() - t0, 1),
    )
    deadline = time.time() + 60  # the GCS marks a node dead after missed health checks
    while info.get("killed") in (alive := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) and time.time() < deadline:
        time.sleep(0.5)
    info["alive_nodes"] = sorted(alive)
    info["actors"] = [
        {
            "class": a.get("ActorClassName") or a.get("Name"),
            "state": a.get("State"),
            "restarts": a.get("NumRestarts"),
            "node": (a.get("Address") or {}).get("NodeID"),
        }
        for a in ray._private.state.actors().values()
    ]
    Path(result_file).write_text(json.dumps(info))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
