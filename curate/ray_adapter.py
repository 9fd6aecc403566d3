"""The one module that talks to Ray. Stages are plain Python; this module decides how they run.

- `connect()`: a local `ray.init()` by default, or a cluster address ("auto", "ray://host:10001").
- `cpu_task()`: a stage function as a Ray task (fetching, annotating: CPU work, one shard a task).
- `ActorPool`: long-lived actors that load a model once (`num_gpus=1` when the cluster has GPUs;
  decided from the cluster's resources, never from the driver's own CUDA).
- `wait_one()` / `get()` / `describe_error()`: the runner's loop over shard futures, so that one
  bad shard is recorded with its error and never hides or stops the others.

Ray's spelling of these APIs has changed across releases; only this file needs to follow it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import ray
from curate.config import RayConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    address: str | None
    cpus: float
    gpus: float
    nodes: int

    def as_dict(self) -> dict:
        return {"address": self.address, "cpus": self.cpus, "gpus": self.gpus, "nodes": self.nodes}


def connect(cfg: RayConfig) -> ClusterInfo:
    if not ray.is_initialized():
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
        if cfg.address:
            ray.init(address=cfg.address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(
                num_cpus=cfg.num_cpus,
                include_dashboard=False,
                runtime_env=env,
                log_to_driver=True,
                configure_logging=True,
                logging_level=logging.WARNING,
            )
    res = ray.cluster_resources()
    return ClusterInfo(cfg.address, float(res.get("CPU", 0)), float(res.get("GPU", 0)), len(ray.nodes()))


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cpu_task(fn: Callable, num_cpus: float = 1, max_retries: int = 2, num_returns: int = 1) -> Any:
    """`fn` as a Ray task. System failures (a dead worker or node) are retried; an exception the
    stage raises is not (a corrupt shard fails the same way every time) and is reported.
    num_returns > 1: the task returns that many objects (a shuffle's map side: one per partition)."""
    return ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False, num_returns=num_returns)(fn)


def put(value: Any) -> Any:
    """Place a value in the object store once, to pass to many tasks by reference."""
    return ray.put(value)


def ensure_connected() -> None:
    """Steps that may run outside `curate run` (selection with dedup.engine = "ray") join the
    Ray the process already has, or start a local one."""
    if not ray.is_initialized():
        connect(RayConfig())


class ActorPool:
    """N actors of `cls(*args)`; each loads its model once. Work goes to the least-busy actor."""

    def __init__(self, cls: type, args: tuple, size: int, gpus_per_actor: float, cpus_per_actor: float):
        remote_cls = ray.remote(cls).options(
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
            max_restarts=2,
            max_task_retries=2,  # outputs are written under deterministic names: a rerun is harmless
        )
        self.actors = [remote_cls.remote(*args) for _ in range(size)]
        self._load = [0] * size

    def submit(self, method: str, *args: Any) -> tuple[Any, int]:
        i = min(range(len(self.actors)), key=self._load.__getitem__)
        self._load[i] += 1
        return getattr(self.actors[i], method).remote(*args), i

    def done(self, i: int) -> None:
        self._load[i] -= 1

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)


def wait_one(refs: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    return ray.wait(list(refs), num_returns=1)


def get(ref: Any) -> Any:
    """One ref or a list of refs."""
    return ray.get(ref)


def describe_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def progress_disabled() -> bool:
    return os.environ.get("CURATE_PROGRESS", "1") == "0"
