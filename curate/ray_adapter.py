"""The one module that talks to Ray: `RayExecutor`, the Ray implementation of curate/executor.py's
interface (the runner and the Ray dedup engine talk to that interface only; LocalExecutor runs the
same work in-process, without Ray). Stages are plain Python; this module decides how they run.

- `connect()`: a new local Ray by default (never one that happens to run on the machine), the
  cluster in RAY_ADDRESS (set inside a Ray job), or a given address ("auto", "host:6379",
  "ray://host:10001"). A local start gets `ray.init_timeout_s` for Ray's start-up waits and, if
  it fails, is cleaned up and retried once; a cluster address that does not answer is an error at
  once (cluster/README.md).
- `RayExecutor.submit()`: a stage function as a Ray task (fetching, annotating: CPU work, one shard
  a task), with the resources the caller declares (curate.executor.Resources). Ray's remote
  functions are made once per function and resources, and `num_returns=p` always gives p futures
  (Ray's own single return is not a list).
- `RayActorPool`: long-lived actors that load a model once, each with the resources the caller
  declares (the runner: a GPU when the cluster has GPUs, `gpus_per_scorer()`, decided from the
  cluster's resources, never from the driver's own CUDA; plus any custom resources,
  `ray.scorer_resources`, to keep scoring on the nodes that have them). Each actor records the
  GPU ids Ray assigned it before its __init__ runs, and the model goes on that GPU or, with none,
  on the CPU (curate.model.choose_device).

Fault tolerance: a task whose worker or node dies is retried (`TASK_RETRIES`); a dead actor is
restarted (`ACTOR_RESTARTS`) and its unfinished calls are resubmitted to it (`ACTOR_TASK_RETRIES`).
Redoing work is safe because every output has a deterministic name and the completion marker is
written last (curate/shard_jobs.py). An exception a stage raises is not retried.
- `wait_first()` / `result()`: the runner's loop over shard futures, so that one bad shard is
  recorded with its error and never hides or stops the others; a call whose actor is dead for good
  raises curate.executor.ActorDied (Ray's ActorDiedError), anything else is the stage's own error.

Ray's spelling of these APIs has changed across releases; only this file needs to follow it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Iterable

import ray
import psutil  # a Ray dependency (vendored in ray/thirdparty_files, importable once ray is)
from curate import faults
from curate.config import RayConfig
from curate.executor import ActorDied, ActorPool, ClusterInfo, Executor, Future, Resources, describe_error
from curate.executor import gpus_per_scorer as gpus_per_scorer  # re-exported: the runner's rule, tested here
import sys
import subprocess
import socket

log = logging.getLogger(__name__)

TASK_RETRIES = 2  # per CPU task, on a dead worker or node
ACTOR_RESTARTS = 3  # per scoring actor: a crash or a lost node each cost one; then the actor is dead for good
# A call to an actor that died before answering is retried until the actor answers again or is
# dead for good (-1). A finite count is spent by fast-failing retries while the cluster has not
# yet noticed a lost node (ActorUnavailableError, seconds), failing shards the restarted actor
# would have scored; the restart budget above is what bounds a crash loop.
ACTOR_TASK_RETRIES = -1


def connect(cfg: RayConfig) -> ClusterInfo:
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        env = {
            "env_vars": {
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore::DeprecationWarning",
                # read by each worker of this job when it starts: its task results above this size go
                # to its node's object store, not inline into the driver's memory (RayConfig.inline_return_bytes)
                "RAY_max_direct_call_object_size": str(cfg.inline_return_bytes),
                **faults.forwarded_env(),
            }
        }
        if address:
            _join(address, env, cfg.init_timeout_s)
        else:
            _start_local(cfg, env)
    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    shapes = tuple(
        (float(n.get("Resources", {}).get("CPU", 0)), float(n.get("Resources", {}).get("GPU", 0))) for n in alive
    )
    return ClusterInfo(address, float(res.get("CPU", 0)), float(res.get("GPU", 0)), len(alive), shapes)


# Ray's start-up waits that a driver can set (Ray 2.60; each read from the driver's environment,
# in whole seconds, default 30 and 10):
#   RAY_gcs_server_port_wait_time_s  ray/_private/node.py: the wait for the GCS to write its port
#                                    file, and the number of 1 s tries to connect to it
#   RAY_raylet_start_wait_time_s     C++ GlobalStateAccessor::GetNode, called by node.py's loop
#                                    that waits for the raylet to register (that loop gives up
#                                    after a fixed 30 s, so the wait is max(30, this))
# Both are set for a local start only and restored afterwards (the processes started meanwhile
# keep them).
STARTUP_WAIT_ENV = ("RAY_gcs_server_port_wait_time_s", "RAY_raylet_start_wait_time_s")


@contextlib.contextmanager
def _startup_waits(seconds: int):
    old = {k: os.environ.get(k) for k in STARTUP_WAIT_ENV}
    os.environ.update({k: str(seconds) for k in STARTUP_WAIT_ENV})
    # the driver's C++ RayConfig re-reads RAY_* now (ray.init does the same when auth is on)
    with contextlib.suppress(Exception):
        ray._raylet.Config.initialize("")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_local(cfg: RayConfig, env: dict) -> None:
    """A new local Ray. A start that fails (a start-up wait ran out on a loaded machine, a process
    that died starting) is cleaned up (`ray.shutdown()` and the processes it had started) and
    retried once; a second failure is a RuntimeError that says what to do."""
    timeout = cfg.init_timeout_s
    errors: list[str] = []
    for attempt in (1, 2):
        before = _ray_children()
        # test hook (curate/faults.py): this attempt gets 0 s waits, so Ray's own start-up times out
        waits = 0 if faults.armed("ray_start_timeout", f"attempt {attempt}") else int(timeout)
        t0 = time.monotonic()
        try:
            with _startup_waits(waits):
                ray.init(
                    address="local",  # not a `ray start` instance that ray.init() would otherwise join
                    num_cpus=cfg.num_cpus,
                    include_dashboard=False,
                    runtime_env=env,
                    log_to_driver=True,
                    configure_logging=True,
                    logging_level=logging.WARNING,
                )
            _reap_on_driver_death([p for pid, p in _ray_children().items() if pid not in before])
            return
        except (TypeError, ValueError):  # bad arguments: the same every time
            _clean_failed_start(before)
            raise
        except Exception as e:  # noqa: BLE001 - retried once, then raised with both errors
            elapsed = time.monotonic() - t0
            left = _clean_failed_start(before)
            errors.append(f"{describe_error(e)} after {elapsed:.1f} s")
            if attempt == 1:
                log.warning(
                    "Ray did not start in %.1fs (%s; ray.init_timeout_s = %g; killed %d leftover Ray "
                    "processes); retrying once",
                    elapsed,
                    describe_error(e),
                    timeout,
                    len(left),
                )
                continue
            raise RuntimeError(
                f"a local Ray did not start, twice: {errors[0]}; then {errors[1]}. On a loaded machine give it "
                f"longer: a larger ray.init_timeout_s (now {timeout:g}; e.g. [ray] init_timeout_s = "
                f"{min(3600, 2 * max(timeout, 60)):g} in the spec); or start Ray once yourself "
                f"(`ray start --head --port 6379`) and pass its address (--address 127.0.0.1:6379)"
            ) from e


def _ray_children() -> dict[int, Any]:
    """This process's descendants that are Ray processes (GCS, raylet, agents, workers)."""
    ray_dir = os.path.dirname(ray.__file__)
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if ray_dir in cmd or cmd.startswith("ray::"):
            out[p.pid] = p
    return out


def _clean_failed_start(before: dict[int, Any]) -> list[int]:
    """After a failed ray.init: `ray.shutdown()`, then kill the Ray processes the attempt started
    that are still there. ray.shutdown() alone does not stop them when ray.init failed inside
    Ray's Node() (a GCS that started after its port wait ran out keeps running, holding ports and
    memory, until the driver exits). Returns the pids killed."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    left = [p for pid, p in _ray_children().items() if pid not in before]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    return [p.pid for p in left]


# A local Ray's dashboard and runtime-env agents outlive a driver killed with SIGKILL by a minute
# or more (each reports the raylet's death to a GCS that died too, with a fixed 60 s timeout;
# Ray has no setting for it: cluster/README.md). This watchdog, a tiny process of its own, waits
# for the driver to be gone and then kills the Ray processes that driver's start made, each
# checked by pid and start time (a reused pid is never touched).
_WATCHDOG = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])  # Ray's bundled psutil
import psutil

driver, procs = int(sys.argv[1]), json.loads(sys.stdin.read())
def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while alive(driver):
    time.sleep(0.5)
for pid, created in procs:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            p.kill()
    except psutil.Error:
        pass
"""


def _reap_on_driver_death(procs: list[Any]) -> None:
    """Start the watchdog above for this driver's local Ray processes (best effort: a platform
    without it keeps Ray's own, slower clean-up)."""
    try:
        listed = json.dumps([[p.pid, p.create_time()] for p in procs])
        w = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(os.getpid()),
                os.path.join(os.path.dirname(ray.__file__), "thirdparty_files"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        w.stdin.write(listed.encode())
        w.stdin.close()
    except Exception:  # noqa: BLE001 - a missing watchdog only means Ray's own (slower) clean-up
        log.debug("no driver watchdog for the local Ray", exc_info=True)


def _join(address: str, env: dict, timeout: float) -> None:
    """Join a running cluster. Not retried: a cluster address that refuses is an error at once,
    naming the address (Ray itself would keep trying for minutes)."""
    target = _gcs_host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=min(timeout, 10.0)).close()
        except OSError as e:
            raise RuntimeError(
                f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); check --address / "
                f"ray.address / RAY_ADDRESS, and that `ray start --head` runs there"
            ) from None
    try:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    except Exception as e:
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise RuntimeError(f"could not join the Ray cluster at {address!r}: {describe_error(e)}") from e


def _gcs_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "ray://host:port"; None for "auto" and anything else (Ray
    resolves those itself)."""
    rest = address.removeprefix("ray://")
    if "://" in rest or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cpu_task(
    fn: Callable,
    num_cpus: float = 1,
    max_retries: int = TASK_RETRIES,
    num_returns: int = 1,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
) -> Any:
    """`fn` as a Ray task. System failures (a dead worker or node) are retried; an exception the
    stage raises is not (a corrupt shard fails the same way every time) and is reported.
    num_returns > 1: the task returns that many objects (a shuffle's map side: one per partition).
    GPUs and custom resources are passed to Ray only when asked for (Ray's defaults otherwise)."""
    extra: dict[str, Any] = {}
    if num_gpus:
        extra["num_gpus"] = num_gpus
    if resources:
        extra["resources"] = dict(resources)
    return ray.remote(
        num_cpus=num_cpus,
        max_retries=max_retries,
        retry_exceptions=False,
        num_returns=num_returns,
        **extra,
        **_forwarded_runtime_env(),
    )(fn)


def _forwarded_runtime_env() -> dict:
    """A failpoint set in the driver (curate/faults.py, tests only) reaches workers even when the
    process joined a Ray that was started before it was set."""
    env = faults.forwarded_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


class RayFuture(Future):
    """A Ray ObjectRef, kept inside: callers see a curate.executor.Future only."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any, slot: int | None = None, actor: Any = None):
        super().__init__(slot, actor)
        self.ref = ref

    def fetch(self) -> Any:
        return ray.get(self.ref)  # inside a task: Ray tracks the ref the pickled future carries


class RayExecutor(Executor):
    """Tasks and actors on Ray: `connect(cfg)` first (a new local Ray by default, RAY_ADDRESS, or
    cfg.address; joins the Ray this process already has). Tasks are retried on a dead worker or
    node (TASK_RETRIES), never on an exception of the stage; failpoints set in the driver reach the
    workers (`_forwarded_runtime_env`)."""

    def __init__(self, cfg: RayConfig | None = None):
        self.cluster = connect(cfg or RayConfig())
        self._tasks: dict[tuple, Any] = {}  # one Ray remote function per (function, resources, returns, env)

    def _task(self, fn: Callable, res: Resources, num_returns: int | None) -> Any:
        key = (fn, res.key(), num_returns, tuple(faults.forwarded_env().items()))
        task = self._tasks.get(key)
        if task is None:
            body = _first_of(fn) if num_returns == 1 else fn  # Ray's single return is the whole sequence
            task = cpu_task(body, res.cpus, num_returns=num_returns or 1, num_gpus=res.gpus, resources=res.custom)
            self._tasks[key] = task
        return task

    def submit(
        self, fn: Callable, *args: Any, resources: Resources = Resources(), num_returns: int | None = None
    ) -> Any:
        args = tuple(a.ref if isinstance(a, RayFuture) else a for a in args)  # Ray resolves refs itself
        refs = self._task(fn, resources, num_returns).remote(*args)
        if num_returns is None:
            return RayFuture(refs)
        return [RayFuture(r) for r in (refs if num_returns > 1 else [refs])]

    def wait_first(self, futures: Iterable[Future]) -> Future:
        by_ref = {f.ref: f for f in futures}  # type: ignore[attr-defined]
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        return by_ref[ready[0]]

    def result(self, future: Future) -> Any:
        return self.results([future])[0]

    def available(self) -> dict[str, float]:
        return {k: v for k, v in ray.available_resources().items() if "node:" not in k and "memory" not in k}

    def results(self, futures: list[Future]) -> list[Any]:
        try:
            return ray.get([f.ref for f in futures])  # type: ignore[attr-defined]
        except ray.exceptions.ActorDiedError as e:
            raise ActorDied(describe_error(e)) from e

    def actor_pool(
        self, cls: type, args: tuple, size: int, resources: Resources, max_restarts: int = ACTOR_RESTARTS
    ) -> RayActorPool:
        return RayActorPool(cls, args, size, resources, max_restarts)


def _first_of(fn: Callable) -> Callable:
    """`fn` returning its only value (a one-partition map task: Ray stores one return as is)."""

    @functools.wraps(fn)
    def first(*args: Any) -> Any:
        return fn(*args)[0]

    return first


class RayActorPool(ActorPool):
    """N Ray actors of `cls(*args)`, each with `resources` (CPUs, GPUs, and custom resources that
    make actors land only on the nodes that advertise them). A crashed actor is restarted
    (`max_restarts`) and its unfinished calls are resubmitted to it (ACTOR_TASK_RETRIES); one dead
    for good is replaced by the caller (`replace`). `actors`: the Ray handles (placement tests)."""

    def __init__(self, cls: type, args: tuple, size: int, resources: Resources, max_restarts: int = ACTOR_RESTARTS):
        super().__init__(size)
        self._remote_cls = ray.remote(_records_gpus(cls)).options(
            num_gpus=resources.gpus,
            num_cpus=resources.cpus,
            resources=dict(resources.custom),
            max_restarts=max_restarts,
            max_task_retries=ACTOR_TASK_RETRIES,  # outputs are written under deterministic names: a rerun is harmless
            **_forwarded_runtime_env(),
        )
        self._args = args
        self.actors = [self._remote_cls.remote(*args) for _ in range(size)]

    def _call(self, i: int, method: str, *args: Any) -> Future:
        actor = self.actors[i]
        return RayFuture(getattr(actor, method).remote(*args), slot=i, actor=actor)

    def replace(self, i: int, dead: Future) -> bool:
        if self.actors[i] is not dead.actor:
            return False
        with contextlib.suppress(Exception):
            ray.kill(dead.actor)
        self.actors[i] = self._remote_cls.remote(*self._args)
        self.replaced += 1
        return True

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on now (for the manifest and placement tests); [] on a Ray
        without `__ray_call__`."""
        try:
            return ray.get([a.__ray_call__.remote(_node_id) for a in self.actors])
        except AttributeError:
            return []

    def placement(self) -> list[dict]:
        """Per actor: the Ray node, the GPU ids Ray assigned and all its assigned resources
        (e.g. {"CPU": 1.0, "GPU": 1.0}), as Ray sees them inside the actor."""
        return ray.get([a.__ray_call__.remote(_placement) for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


GPU_IDS_ENV = "CURATE_RAY_GPU_IDS"  # = curate.model.RAY_GPU_IDS_ENV (not imported here: torch)


def _records_gpus(cls: type) -> type:
    """`cls` whose __init__ first records the GPU ids Ray assigned to the actor in
    CURATE_RAY_GPU_IDS (curate.model.choose_device reads it: the model goes on the GPU Ray gave
    this actor, and an actor Ray gave none stays on the CPU even on a GPU node). Same name, so
    Ray's process titles and errors still say ShardScorer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ[GPU_IDS_ENV] = ",".join(str(i) for i in ray.get_gpu_ids())
        cls.__init__(self, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__},
    )


def _node_id(_actor: Any) -> str:
    return ray.get_runtime_context().get_node_id()


def _placement(_actor: Any) -> dict:
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "resources": dict(ctx.get_assigned_resources()),
    }


def get(ref: Any) -> Any:
    """One ref or a list of refs (of a `cpu_task`)."""
    return ray.get(ref)
