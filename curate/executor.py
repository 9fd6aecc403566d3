"""Where a run's work executes, behind one small interface, so that the runner and the Ray
dedup engine say *what* to run and never *how*:

- `Executor.submit(fn, *args, resources=...)` -> `Future`; `wait_first(futures)`; `result(future)`.
- `Executor.actor_pool(cls, args, size, resources)` -> `ActorPool`: long-lived instances (a model
  loaded once) called by slot, with a dead one replaced by a fresh one.
- `Resources`: what one task or actor needs (CPUs, GPUs, custom resources), declared by the caller.

Two implementations: `RayExecutor` (curate/ray_adapter.py: Ray tasks and actors, with retries,
restarts and failpoint forwarding) and `LocalExecutor` below, which runs everything in this
process and never imports Ray, so that the runner's composition can be tested in seconds.

Errors: `result()` raises `ActorDied` when the call failed because its actor is dead for good
(restarts used up: nothing the stage did wrong that a caller could report as the stage's error),
and otherwise re-raises what the stage raised. `describe_error()` turns either into one line.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Resources:
    """What one task or one actor needs. GPUs are fractional in Ray's sense; `custom` are named
    resources that only some nodes advertise (e.g. {"accel": 1}) to place work on those nodes."""

    cpus: float = 1
    gpus: float = 0
    custom: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple:
        """A hashable form (the dict makes the dataclass itself unhashable)."""
        return (self.cpus, self.gpus, tuple(sorted(self.custom.items())))


@dataclass(frozen=True)
class ClusterInfo:
    """What the executor has to run on: recorded in the manifest (m["cluster"])."""

    address: str | None
    cpus: float
    gpus: float
    nodes: int
    # (CPUs, GPUs) of each alive node, where the executor can tell (Ray can): the layout sizes
    # actors for the nodes that will hold them (a CPU-less head, GPU nodes with few cores), not for
    # an average node. Empty: nodes assumed alike.
    node_shapes: tuple[tuple[float, float], ...] = ()

    def as_dict(self) -> dict:
        return {"address": self.address, "cpus": self.cpus, "gpus": self.gpus, "nodes": self.nodes}


def gpus_per_scorer(info: ClusterInfo) -> float:
    """GPUs for each scoring actor: 1 when the cluster reports GPUs, else 0. Decided from the
    cluster's resources, never from the driver's own CUDA (the driver may run on a CPU head)."""
    return 1.0 if info.gpus > 0 else 0.0


class ActorDied(Exception):
    """A call failed because its actor is dead for good (its restarts are used up, or it was
    killed); the message describes the underlying failure. Calls queued on that actor fail the same
    way, whatever they were: the caller decides what to resubmit (curate/runner.py)."""


class ActorCrash(Exception):
    """Raised inside an actor method run by the LocalExecutor, it stands for the actor's process
    dying (what os._exit does to a Ray actor): the actor is restarted and the call retried, as Ray
    does, until its restarts are used up; then the call, and every later one on that actor, fails
    with ActorDied. A test hook: under Ray it is an ordinary exception of the stage."""


class Future:
    """The outcome of one submitted call, to pass to `wait_first` and `result` of the executor that
    made it. `slot` and `actor` say which actor ran it (None for a task): `ActorPool.replace` uses
    them to replace that actor only if the slot still holds it."""

    __slots__ = ("slot", "actor")

    def __init__(self, slot: int | None = None, actor: Any = None):
        self.slot = slot
        self.actor = actor

    def fetch(self) -> Any:
        """The value, fetched by the task this future was passed to inside a list (a list is not
        resolved before the task starts): a task that merges many outputs one at a time
        (uids.npy's streaming merge), so neither it nor the driver holds them all."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fetched inside a task")


class ActorPool(ABC):
    """`size` instances of one class; the caller picks the slot for each call (`loads()`, `call()`),
    reports each call it has collected (`done()`) and replaces an actor that is dead for good."""

    def __init__(self, size: int):
        self._load = [0] * size
        self.replaced = 0  # actors replaced so far (the manifest's scorer_replacements)

    @property
    def size(self) -> int:
        return len(self._load)

    def loads(self) -> list[int]:
        """Calls in flight per slot: made by `call`, not yet reported by `done`."""
        return list(self._load)

    def call(self, i: int, method: str, *args: Any) -> Future:
        """`method(*args)` on the actor in slot i."""
        self._load[i] += 1
        return self._call(i, method, *args)

    def done(self, i: int) -> None:
        """The caller has collected a call made to slot i."""
        self._load[i] -= 1

    @abstractmethod
    def _call(self, i: int, method: str, *args: Any) -> Future: ...

    @abstractmethod
    def call_all(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every actor; their results in slot order (waits for them)."""

    @abstractmethod
    def replace(self, i: int, dead: Future) -> bool:
        """Put a fresh actor in slot i if it still holds the actor that ran `dead` (a call that
        raised ActorDied). Without this one poison input that crashes its actor on every try would
        take every later call sent to that slot down with it. True when replaced now; False when
        an earlier failure of the same actor already did it."""

    @abstractmethod
    def node_ids(self) -> list[str]:
        """The node each actor runs on now ([] where the backend cannot say)."""

    @abstractmethod
    def placement(self) -> list[dict]:
        """Per actor: {"node_id", "gpu_ids", "resources"} as the backend assigned them."""

    @abstractmethod
    def close(self) -> None:
        """Stop every actor."""


class Executor(ABC):
    """Runs tasks and actor pools; see the module docstring."""

    cluster: ClusterInfo

    @abstractmethod
    def submit(
        self, fn: Callable, *args: Any, resources: Resources = Resources(), num_returns: int | None = None
    ) -> Any:
        """`fn(*args)` as a task -> Future. An argument that is a Future of this executor stands
        for its value (on Ray it goes from task to task, not through the driver). With
        `num_returns=p` (p >= 1) `fn` returns a sequence of p values and this returns a list of p
        futures, one per value (a shuffle's map side: a reducer then gets its own partition of
        every map output only)."""

    @abstractmethod
    def wait_first(self, futures: Iterable[Future]) -> Future:
        """One finished future of `futures` (waits until there is one)."""

    @abstractmethod
    def result(self, future: Future) -> Any:
        """The value of a future; raises ActorDied, or what the stage raised."""

    def results(self, futures: list[Future]) -> list[Any]:
        return [self.result(f) for f in futures]

    def available(self) -> dict[str, float]:
        """Resources free right now (for the message of a run whose work waits: curate/runner.py)."""
        return {"CPU": self.cluster.cpus, "GPU": self.cluster.gpus}

    @abstractmethod
    def actor_pool(
        self, cls: type, args: tuple, size: int, resources: Resources, max_restarts: int = 3
    ) -> ActorPool: ...


def describe_error(e: BaseException) -> str:
    """One line for an error: the stage's own exception where the backend wrapped it (`cause`)."""
    if isinstance(e, ActorDied):
        return str(e)
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


# --- in this process --------------------------------------------------------------------------


class LocalFuture(Future):
    """Already settled: the LocalExecutor runs each call when it is submitted."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None, slot: int | None = None, actor=None):
        super().__init__(slot, actor)
        self.value, self.error = value, error

    def fetch(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class LocalExecutor(Executor):
    """Everything in this process, one call at a time, each run when it is submitted: the order of
    results is the order of submission, so a run is deterministic. Never imports Ray.

    `cpus`, `gpus` and `custom` describe what this process offers: a task or actor that asks for
    more is refused (ValueError) instead of waiting forever as it would on a cluster. A GPU is not
    assigned to anything here: the model goes where curate.model.choose_device puts it outside Ray."""

    def __init__(self, cpus: float | None = None, gpus: float = 0, custom: dict[str, float] | None = None):
        self.cluster = ClusterInfo("in-process", float(cpus or os.cpu_count() or 1), float(gpus), 1)
        self._custom = dict(custom or {})

    def check_fits(self, res: Resources) -> None:
        have = {"CPU": self.cluster.cpus, "GPU": self.cluster.gpus, **self._custom}
        need = {"CPU": res.cpus, "GPU": res.gpus, **res.custom}
        short = [f"{k} {v:g} (has {have.get(k, 0):g})" for k, v in need.items() if v > have.get(k, 0)]
        if short:
            raise ValueError(f"the LocalExecutor cannot give {', '.join(short)}")

    def submit(
        self, fn: Callable, *args: Any, resources: Resources = Resources(), num_returns: int | None = None
    ) -> Any:
        self.check_fits(resources)
        try:
            value, error = fn(*[self.result(a) if isinstance(a, LocalFuture) else a for a in args]), None
        except Exception as e:  # noqa: BLE001 - kept in the future, raised by result()
            value, error = None, e
        if num_returns is None:
            return LocalFuture(value, error)
        if error is None and len(value) != num_returns:
            error = ValueError(f"{getattr(fn, '__name__', fn)} returned {len(value)} values, not {num_returns}")
        return [LocalFuture(None if error else value[j], error) for j in range(num_returns)]

    def wait_first(self, futures: Iterable[Future]) -> Future:
        for f in futures:
            return f
        raise ValueError("wait_first: no futures")

    def result(self, future: Future) -> Any:
        assert isinstance(future, LocalFuture), future
        if future.error is not None:
            raise future.error
        return future.value

    def actor_pool(self, cls: type, args: tuple, size: int, resources: Resources, max_restarts: int = 3) -> ActorPool:
        self.check_fits(resources)
        return LocalActorPool(cls, args, size, resources, max_restarts)


class _LocalActor:
    """One actor: its instance, the restarts it has left, and why it is dead for good (None: alive)."""

    def __init__(self, cls: type, args: tuple, restarts: int):
        self.cls, self.args, self.restarts = cls, args, restarts
        self.instance = cls(*args)
        self.dead: str | None = None

    def call(self, method: str, *args: Any) -> Any:
        """Like a Ray actor with max_task_retries = -1: a crash restarts it and retries the call."""
        while self.dead is None:
            try:
                return getattr(self.instance, method)(*args)
            except ActorCrash as e:
                if self.restarts <= 0:
                    self.dead = f"ActorDied: the {self.cls.__name__} actor crashed with no restarts left ({e})"
                else:
                    self.restarts -= 1
                    self.instance = self.cls(*self.args)
        raise ActorDied(self.dead)


class LocalActorPool(ActorPool):
    def __init__(self, cls: type, args: tuple, size: int, resources: Resources, max_restarts: int):
        super().__init__(size)
        self._cls, self._args, self._restarts, self._resources = cls, args, max_restarts, resources
        self._actors = [_LocalActor(cls, args, max_restarts) for _ in range(size)]

    def _call(self, i: int, method: str, *args: Any) -> Future:
        actor = self._actors[i]
        try:
            return LocalFuture(actor.call(method, *args), slot=i, actor=actor)
        except Exception as e:  # noqa: BLE001 - kept in the future, raised by result()
            return LocalFuture(error=e, slot=i, actor=actor)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return [a.call(method, *args) for a in self._actors]

    def replace(self, i: int, dead: Future) -> bool:
        if self._actors[i] is not dead.actor:
            return False
        self._actors[i] = _LocalActor(self._cls, self._args, self._restarts)
        self.replaced += 1
        return True

    def node_ids(self) -> list[str]:
        return ["local"] * self.size

    def placement(self) -> list[dict]:
        r = self._resources
        res = {"CPU": float(r.cpus), **({"GPU": float(r.gpus)} if r.gpus else {}), **r.custom}
        return [{"node_id": "local", "gpu_ids": [], "resources": dict(res)} for _ in range(self.size)]

    def close(self) -> None:
        self._actors.clear()
