"""The one module that talks to Ray. Stages are plain Python; this module decides how they run.

- `connect()`: a new local Ray by default (never one that happens to run on the machine), the
  cluster in RAY_ADDRESS (set inside a Ray job), or a given address ("auto", "host:6379",
  "ray://host:10001").
- `cpu_task()`: a stage function as a Ray task (fetching, annotating: CPU work, one shard a task).
- `ActorPool`: long-lived actors that load a model once (`num_gpus=1` when the cluster has GPUs;
  decided from the cluster's resources, never from the driver's own CUDA; plus any custom
  resources, `ray.scorer_resources`, to keep scoring on the nodes that have them).

Fault tolerance: a task whose worker or node dies is retried (`TASK_RETRIES`); a dead actor is
restarted (`ACTOR_RESTARTS`) and its unfinished calls are resubmitted to it (`ACTOR_TASK_RETRIES`).
Redoing work is safe because every output has a deterministic name and the completion marker is
written last (curate/shard_jobs.py). An exception a stage raises is not retried.
- `wait_one()` / `get()` / `describe_error()`: the runner's loop over shard futures, so that one
  bad shard is recorded with its error and never hides or stops the others.

Ray's spelling of these APIs has changed across releases; only this file needs to follow it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import ray
from curate import faults
from curate.config import RayConfig

log = logging.getLogger(__name__)

TASK_RETRIES = 2  # per CPU task, on a dead worker or node
ACTOR_RESTARTS = 3  # per scoring actor: a crash or a lost node each cost one; then the actor is dead for good
# A call to an actor that died before answering is retried until the actor answers again or is
# dead for good (-1). A finite count is spent by fast-failing retries while the cluster has not
# yet noticed a lost node (ActorUnavailableError, seconds), failing shards the restarted actor
# would have scored; the restart budget above is what bounds a crash loop.
ACTOR_TASK_RETRIES = -1


@dataclass(frozen=True)
class ClusterInfo:
    address: str | None
    cpus: float
    gpus: float
    nodes: int

    def as_dict(self) -> dict:
        return {"address": self.address, "cpus": self.cpus, "gpus": self.gpus, "nodes": self.nodes}


def connect(cfg: RayConfig) -> ClusterInfo:
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning",
                            **faults.forwarded_env()}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(
                address="local",  # not a `ray start` instance that ray.init() would otherwise join
                num_cpus=cfg.num_cpus,
                include_dashboard=False,
                runtime_env=env,
                log_to_driver=True,
                configure_logging=True,
                logging_level=logging.WARNING,
            )
    res = ray.cluster_resources()
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(address, float(res.get("CPU", 0)), float(res.get("GPU", 0)), alive)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cpu_task(fn: Callable, num_cpus: float = 1, max_retries: int = TASK_RETRIES, num_returns: int = 1) -> Any:
    """`fn` as a Ray task. System failures (a dead worker or node) are retried; an exception the
    stage raises is not (a corrupt shard fails the same way every time) and is reported.
    num_returns > 1: the task returns that many objects (a shuffle's map side: one per partition)."""
    return ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False, num_returns=num_returns,
                      **_forwarded_runtime_env())(fn)


def _forwarded_runtime_env() -> dict:
    """A failpoint set in the driver (curate/faults.py, tests only) reaches workers even when the
    process joined a Ray that was started before it was set."""
    env = faults.forwarded_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def ensure_connected() -> None:
    """Steps that may run outside `curate run` (selection with dedup.engine = "ray") join the
    Ray the process already has, or start a local one."""
    if not ray.is_initialized():
        connect(RayConfig())


class ActorPool:
    """N actors of `cls(*args)`; each loads its model once. The caller picks the slot for each call
    (`loads()`, `submit_to()`) and replaces an actor that is dead for good (`replace()`).
    `resources`: Ray custom resources each actor requires (e.g. {"accel": 1}), so that actors
    land only on the nodes that advertise them."""

    def __init__(self, cls: type, args: tuple, size: int, gpus_per_actor: float, cpus_per_actor: float,
                 resources: dict[str, float] | None = None, max_restarts: int = ACTOR_RESTARTS):
        self._remote_cls = ray.remote(cls).options(
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
            resources=dict(resources or {}),
            max_restarts=max_restarts,
            max_task_retries=ACTOR_TASK_RETRIES,  # outputs are written under deterministic names: a rerun is harmless
            **_forwarded_runtime_env(),
        )
        self._args = args
        self.actors = [self._remote_cls.remote(*args) for _ in range(size)]
        self._load = [0] * size
        self.replaced = 0

    def loads(self) -> list[int]:
        """Calls in flight per actor slot."""
        return list(self._load)

    def submit_to(self, i: int, method: str, *args: Any) -> Any:
        self._load[i] += 1
        return getattr(self.actors[i], method).remote(*args)

    def handle(self, i: int) -> Any:
        return self.actors[i]

    def replace(self, i: int, dead: Any) -> bool:
        """Put a fresh actor in slot i if it still holds `dead` (an actor whose restarts are used
        up: every call queued on it fails). Without this one poison shard that crashes its actor
        on every try would take every later shard sent to that slot down with it. True when
        replaced now; False when an earlier failure of the same actor already did it."""
        if self.actors[i] is not dead:
            return False
        with contextlib.suppress(Exception):
            ray.kill(dead)
        self.actors[i] = self._remote_cls.remote(*self._args)
        self.replaced += 1
        return True

    def done(self, i: int) -> None:
        self._load[i] -= 1

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on now (for the manifest and placement tests); [] on a Ray
        without `__ray_call__`."""
        try:
            return ray.get([a.__ray_call__.remote(_node_id) for a in self.actors])
        except AttributeError:
            return []

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _node_id(_actor: Any) -> str:
    return ray.get_runtime_context().get_node_id()


def is_actor_dead(e: BaseException) -> bool:
    """The call failed because its actor is dead for good (restarts used up, or killed)."""
    return isinstance(e, ray.exceptions.ActorDiedError)


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
