"""`curate run`: drive every input shard through prepare (CPU tasks) and scoring (actors) on an
executor (curate/executor.py: Ray by default, or in-process), then write the spec's default
selection. Shards flow through in windows of rows as their steps finish (a window is scored
while the next ones are fetched; `ShardScheduler`); a failed shard is recorded with its error and its row count (from the parquet
footer when that is readable, else "unknown") as unaccounted, and the run exits non-zero, but
never hides or stops the other shards. A worker, node or actor that dies is Ray's to retry
(curate/ray_adapter.py); a killed driver is resumed by running the same command again: shards
with a completion marker are not redone."""

from __future__ import annotations

import logging
import math
from collections import deque
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from curate import accounting, annotations, faults, io, manifest, publish, selection
from curate import run_dir as run_dir_mod
from curate.config import PipelineSpec
from curate.executor import ActorDied, ActorPool, ClusterInfo, Executor, Future, Resources, describe_error
from curate.shard_jobs import PREPARE_STAGES, SCORE, ShardScorer, fetch_window, finish_windows, prepare_shard
from curate.layout import ScoreLayout
from curate.layout import resolve as resolve_layout
from curate.stages.base import combined
from curate.stages.read import footer_rows, list_shards, shard_name
from tqdm import tqdm
from curate.stages.annotate import LANGUAGE_MODEL_ID
from curate.annotations import ANNOTATION_COLUMNS
from curate import run_lock

log = logging.getLogger(__name__)

SCORE_QUEUE = 2  # scoring calls in flight per actor: one running, one ready to start
SCORE_RESUBMITS = 2  # times a shard is resubmitted after a dead actor took its call down


def prepare_resources(layout: ScoreLayout) -> Resources:
    """One prepare task runs read, annotate, caption_lsh and fetch for a shard: what those stages
    declare, with the CPUs the layout leaves them (curate/layout.py: never so many that scoring
    actors could hold every CPU and a prepare task wait forever)."""
    declared = combined(PREPARE_STAGES)
    return Resources(cpus=min(declared.cpus, layout.prepare_cpus), gpus=declared.gpus)


def scorer_resources(spec: PipelineSpec, cluster: ClusterInfo, layout: ScoreLayout | None = None) -> Resources:
    """Each scoring actor: what the score stage declares (a GPU when the cluster has any, decided
    from the cluster, never the driver's own CUDA: tests/test_gpu_placement.py), sized by the
    layout (CPUs to decode and run the model), plus the custom resources of ray.scorer_resources,
    so that scoring runs only on the nodes that have them."""
    layout = layout or resolve_layout(spec.score, cluster)
    declared = SCORE.resources(cluster, spec.ray.scorer_resources)
    gpus = layout.actor_gpus if declared.gpus else 0.0
    return Resources(cpus=layout.actor_cpus, gpus=gpus, custom=declared.custom)


def resolved_spec(spec: PipelineSpec, layout: ScoreLayout) -> PipelineSpec:
    """The spec the shards' steps get: the layout's actor count, threads and window size filled in
    (the manifest keeps the user's spec, and m["layout"] what it resolved to)."""
    return spec.with_overrides(
        **{
            "score.actors": layout.actors,
            "score.cpu_threads": layout.model_threads,
            "score.decode_threads": layout.decode_threads,
            "score.window_rows": layout.window_rows,
        }
    )


@dataclass
class RunResult:
    run_dir: str
    shards_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    selection: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def run(spec: PipelineSpec, executor: Executor | None = None) -> RunResult:
    """The whole `curate run`, holding the run directory's writer lock (curate/run_lock.py): a
    second writer is refused, naming this one. The manifest says "complete" only once the
    selection is in place; a Ctrl-C leaves it "interrupted", a crash "failed" (with the error).
    `executor`: where the shards run; None = Ray as `spec.ray` says (a new local Ray, or the
    cluster at its address), connected once the run directory is locked. A LocalExecutor runs the
    whole run in this process without importing Ray (tests)."""
    run_dir = spec.output.dir
    preflight(spec)
    run_dir_mod.check_output_dir(run_dir)  # before the lock file is made: a foreign folder stays untouched
    with run_lock.hold(run_dir):
        return _run(spec, executor)


def preflight(spec: PipelineSpec) -> None:
    """Everything about the spec that can be checked before the first shard: report columns
    that will not exist (after fetching and scoring was too late)."""
    known = set(ANNOTATION_COLUMNS) | set(spec.input.keep_columns)
    unknown = [c for c in spec.report.group_columns if c not in known]
    if unknown:
        raise ValueError(
            f"report.group_columns {unknown} are not annotation columns (nor in input.keep_columns); "
            f"annotation columns: {', '.join(ANNOTATION_COLUMNS)}"
        )


def _run(spec: PipelineSpec, executor: Executor | None) -> RunResult:
    run_dir = spec.output.dir
    previous = run_dir_mod.check_output_dir(run_dir)  # again, under the lock
    shards = list_shards(spec.input)
    # a selection folder holding someone else's files could not be replaced: say so now, not at the end
    publish.check_replaceable(selection.selection_dir(run_dir, spec.selection.name), selection.owned)
    if previous is not None and spec.output.overwrite:
        left = run_dir_mod.remove_outputs(run_dir)  # only what curate wrote; forget/ stays
        if left:
            log.warning(
                "--overwrite left %d file(s) curate did not write in %s: %s",
                len(left),
                run_dir,
                run_dir_mod.describe_left(left),
            )
        previous = None
    elif previous is not None:
        manifest.check_compatible(previous, spec)
    io.makedirs(run_dir)
    m = manifest.new(spec, shards, previous)  # carries the selections over
    manifest.write(run_dir, m)
    try:
        return _run_shards(spec, m, shards, executor)
    except KeyboardInterrupt:
        _final_state(
            run_dir, m, "interrupted", "interrupted by the user (SIGINT); run the same command again to resume"
        )
        raise
    except BaseException as e:
        _final_state(run_dir, m, "failed", f"{type(e).__name__}: {e}")
        raise


def _final_state(run_dir: str, m: dict, state: str, error: str) -> None:
    """Record why a run stopped early; never masks the original exception."""
    try:
        m["state"], m["error"], m["finished_at"] = state, error, manifest.now()
        manifest.write(run_dir, m)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        log.exception("could not record state %r in the manifest", state)


def _run_shards(spec: PipelineSpec, m: dict, shards: list[str], executor: Executor | None) -> RunResult:
    t0 = time.monotonic()
    if executor is None:
        # lazy: ray (~0.4 s), only for a run not given an executor (a LocalExecutor run never imports it)
        from curate.ray_adapter import RayExecutor

        executor = RayExecutor(spec.ray)
    run_dir = spec.output.dir
    m["cluster"] = executor.cluster.as_dict()
    if executor.cluster.node_shapes:
        m["cluster"]["node_shapes"] = [list(n) for n in executor.cluster.node_shapes]  # (CPUs, GPUs) per node
    layout = resolve_layout(spec.score, executor.cluster)
    scoring = spec.score.source == "model" and spec.fetch.enabled
    prepare_res, scorer_res = prepare_resources(layout), scorer_resources(spec, executor.cluster, layout)
    m["layout"] = {**layout.as_dict(), "prepare": prepare_res.__dict__} if scoring else None
    spec_json = resolved_spec(spec, layout).model_dump_json()
    result = RunResult(run_dir)

    pool = None
    if scoring:
        log.info("layout: %s", layout.describe())
        pool = executor.actor_pool(
            ShardScorer,
            (spec_json,),
            size=layout.actors,
            resources=scorer_res,
            max_restarts=spec.ray.scorer_max_restarts,
        )
    paths = {shard_name(p): p for p in shards}
    t_ready = time.monotonic()

    def actors_ready(described: list[dict]) -> None:
        """Every scoring actor has loaded its model (the scheduler prepared and fetched meanwhile)."""
        nonlocal t_ready
        assert pool is not None
        t_ready = time.monotonic()
        m["model"] = described[0]
        m["cluster"]["scorer_nodes"] = pool.node_ids()
        m["cluster"]["scorer_placement"] = pool.placement()  # node, GPU ids and resources per actor
        manifest.write(run_dir, m)

    try:
        if spec.score.source == "column":
            m["model"] = {"model_id": f"input-column:{spec.score.column}"}
        m["language_model"] = LANGUAGE_MODEL_ID if spec.annotate.language else None
        manifest.write(run_dir, m)

        with _progress(len(shards)) as bar:
            scheduler = ShardScheduler(
                executor,
                SHARD_STEPS,
                pool,
                spec_json,
                run_dir,
                m["shards"],
                result,
                bar.update,
                prepare_resources=prepare_res,
                on_actors_ready=actors_ready if pool is not None else None,
                starting_hint=f"each asks {scorer_res}; nodes that advertise it may be missing",
            )
            t_start = time.monotonic()
            scheduler.run(shards)
            t_end = time.monotonic()
            # start-up (executor, model load) apart from the shards' work: throughput is the second.
            # Shards are read, annotated and fetched while the models load (`overlap_s` of it), so
            # `shards_s` counts from the moment the last actor was ready (or the first step, when
            # nothing scores).
            t_ready = max(t_ready, t_start)
            m["timings"] = {
                "startup_s": round(t_ready - t0, 3),
                "shards_s": round(t_end - t_ready, 3),
                "overlap_s": round(t_ready - t_start, 3),
            }
    finally:
        if pool is not None:  # also on Ctrl-C or a crash: a driver that lives on (a notebook, a test) frees its GPUs
            m["cluster"]["scorer_replacements"] = pool.replaced
            _close(pool)

    m["failed_shards"] = result.failed
    m["unaccounted_rows"] = {s: footer_rows(paths[s]) for s in sorted(result.failed)}
    done = annotations.completed_shards(run_dir)
    m["counts"] = accounting.run_totals(run_dir, done).to_json()
    m["state"] = "selecting"  # shards done; "complete" only once the selection is in place
    manifest.write(run_dir, m)
    faults.fire("run.before_selection", run_dir)
    if done:
        result.selection = selection.write_selection(run_dir, spec.selection, spec.report)
    recorded = manifest.read(run_dir)  # write_selection recorded the selection and the output checksums
    m.update({k: recorded[k] for k in ("selections", "selection_specs", "outputs") if k in recorded})
    m["state"] = "failed" if result.failed else "complete"
    m["finished_at"] = manifest.now()
    manifest.write(run_dir, m)
    return result


def _close(pool: ActorPool) -> None:
    try:
        pool.close()
    except Exception:  # noqa: BLE001 - the run's own outcome (or error) is what to report
        log.warning("could not stop the scoring actors", exc_info=True)


def _progress(total: int):
    return tqdm(total=total, desc="shards", unit="shard", disable=os.environ.get("CURATE_PROGRESS", "1") == "0")


STALL_S = float(os.environ.get("CURATE_STALL_S", "60"))  # no progress this long: say so on the console


class StallWatch:
    """Warns (log, stderr) when nothing finished for `limit` seconds, with what is waiting and what
    the executor has free, so that work the cluster cannot place (resources nobody advertises, a
    node that went away) is reported instead of waiting in silence. Repeats every `limit` seconds."""

    def __init__(self, limit: float, describe: Callable[[], str]):
        self.limit, self.describe = limit, describe
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="curate-stall-watch", daemon=True)
        self.warnings = 0

    def __enter__(self) -> "StallWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.limit:
                self.warnings += 1
                log.warning("no progress for %.0f s: %s", idle, self.describe())
                self._last = time.monotonic()


@dataclass(frozen=True)
class ShardSteps:
    """The per-shard work the scheduler runs (curate/shard_jobs.py; tests give stand-ins):
    prepare(path, spec_json, run_dir), fetch(run_dir, shard, window, spec_json) and
    finish(run_dir, shard, spec_json, windows, counts) as tasks; the pool's actors score
    (`score_window(run_dir, shard, window)`)."""

    prepare: Callable[..., dict]
    fetch: Callable[..., dict]
    finish: Callable[..., dict]


SHARD_STEPS = ShardSteps(prepare_shard, fetch_window, finish_windows)


@dataclass(frozen=True)
class _Call:
    stage: str  # "ready" (an actor's model loaded), "prepare", "fetch", "score" or "finish"
    shard: str
    window: int = -1


@dataclass
class _Flight:
    """A prepared shard whose windows are being fetched and scored."""

    windows: int
    counts: dict
    fetched: int = 0
    scored: int = 0  # windows scored, or that needed no scoring
    reused: int = 0  # scoring calls that found their window already scored (a retried call)


class ShardScheduler:
    """Every shard through its steps, as calls finish: `prepare` (a task) reads and annotates it and
    cuts the rows to fetch into windows; each window is fetched by a `fetch` task and, as soon as it
    is, scored by `score_window` on whichever actor of `pool` is free; when every window is fetched
    and scored, a `finish` task writes the shard's files. So scoring starts on a shard's first
    window while the rest is still being fetched, and one big shard is scored by every actor.
    It talks to the executor interface only (curate/executor.py), so it runs the same on Ray and
    in-process. Each shard ends in `result.shards_done` or in `result.failed` with its error (the
    first error of any of its steps), and `on_shard_end(1)` (the progress bar); what prepare and
    finish report of a shard is merged into `records[shard]` (the manifest's shards).

    With `on_actors_ready`, the actors' `describe()` calls go first: shards are read, annotated and
    fetched while the models load, windows go to the actors once every one has loaded, and
    `on_actors_ready(descriptions)` is called then; an actor that cannot load fails the run.

    Work is admitted as the pipeline has room, not all at once: fetch windows go out while fewer
    than `fetch_slots` are in flight and the scoring backlog is short (fetched windows waiting
    for an actor hold images on disk), and a shard is prepared when fetching would otherwise run dry.

    Named state:
      unread     input paths not yet prepared, in order
      flights    shard -> its windows' progress and counts
      to_fetch   (shard, window) not yet sent to a fetch task, in order
      pending    future -> the call in flight (stage, shard, window)
      waiting    fetched windows not yet sent to an actor, in order
      deaths     (shard, window) -> its scoring calls that a dead actor took down
      suspects   windows whose call died with an actor: each is retried ALONE on an idle actor
      isolated   actor slot -> the suspect it runs, with nothing else queued there
      starting   actor slot -> its describe() while the actors load (None until it has loaded)
    """

    def __init__(
        self,
        executor: Executor,
        steps: ShardSteps,
        pool: ActorPool | None,
        spec_json: str,
        run_dir: str,
        records: dict[str, dict],
        result: RunResult,
        on_shard_end: Callable[[int], Any] = lambda n: None,
        prepare_resources: Resources | None = None,
        fetch_slots: int | None = None,
        on_actors_ready: Callable[[list[Any]], Any] | None = None,
        starting_hint: str = "",
    ):
        self.executor, self.steps, self.pool = executor, steps, pool
        self.spec_json, self.run_dir, self.records, self.result = spec_json, run_dir, records, result
        self.on_shard_end = on_shard_end
        self.prepare_resources = prepare_resources or combined(PREPARE_STAGES)  # (default: as the stages declare)
        cpus = executor.cluster.cpus if executor.cluster.cpus > 0 else 1.0
        # enough fetch tasks to fill the CPUs prepare may use (Ray queues what does not fit)
        self.fetch_slots = fetch_slots or max(2, math.ceil(cpus / max(self.prepare_resources.cpus, 1e-3)))
        self.score_backlog = 2 * SCORE_QUEUE * (pool.size if pool is not None else 1)
        self.unread: deque[str] = deque()
        self.flights: dict[str, _Flight] = {}
        self.to_fetch: deque[tuple[str, int]] = deque()
        self.pending: dict[Future, _Call] = {}
        self.waiting: deque[tuple[str, int]] = deque()
        self.deaths: dict[tuple[str, int], int] = {}
        self.suspects: deque[tuple[str, int]] = deque()
        self.isolated: dict[int, tuple[str, int]] = {}
        self.on_actors_ready, self.starting_hint = on_actors_ready, starting_hint
        self.starting: dict[int, Any] = {}  # actor slot -> its `describe()` (None while it loads)

    def run(self, paths: list[str]) -> None:
        self.unread = deque(paths)
        with StallWatch(STALL_S, self.describe_waiting) as watch:
            if self.on_actors_ready is not None:
                assert self.pool is not None
                for i in range(self.pool.size):  # windows go to the actors once all have loaded
                    self.starting[i] = None
                    self.pending[self.pool.call(i, "describe")] = _Call("ready", "", i)
            self._pump()
            while self.pending:
                fut = self.executor.wait_first(self.pending)
                watch.progress()
                self._finished(fut)
                self._pump()
        assert not self.waiting and not self.suspects and not self.to_fetch and not self.unread, (
            self.waiting,
            self.suspects,
            self.to_fetch,
            self.unread,
        )

    # --- admission ----------------------------------------------------------------------------
    def _in_flight(self, stage: str) -> int:
        return sum(c.stage == stage for c in self.pending.values())

    def _pump(self) -> None:
        if self.pool is not None and not self.starting:
            self._dispatch()
        fetching = self._in_flight("fetch")
        while self.to_fetch and fetching < self.fetch_slots and len(self.waiting) < self.score_backlog:
            shard, w = self.to_fetch.popleft()
            self._submit(_Call("fetch", shard, w), self.steps.fetch, self.run_dir, shard, w, self.spec_json)
            fetching += 1
        # a new shard when the windows queued for fetching run short (its prepare reads and
        # annotates meanwhile); shards that need no fetch keep fetch_slots prepares going
        preparing = self._in_flight("prepare")
        while self.unread and len(self.to_fetch) + preparing < self.fetch_slots:
            path = self.unread.popleft()
            self._submit(_Call("prepare", shard_name(path)), self.steps.prepare, path, self.spec_json, self.run_dir)
            preparing += 1

    def _submit(self, call: _Call, fn: Callable[..., Any], *args: Any) -> None:
        self.pending[self.executor.submit(fn, *args, resources=self.prepare_resources)] = call

    def _dispatch(self) -> None:
        """Send fetched windows to actors, at most SCORE_QUEUE calls per actor so that work goes to
        whichever frees up first and a dying actor takes few calls down with it. A suspect runs
        alone on an idle actor: if that actor dies, the suspect killed it, and no innocent window
        queued behind it is taken down again."""
        assert self.pool is not None
        loads = self.pool.loads()
        for i in range(len(loads)):
            if self.suspects and loads[i] == 0 and i not in self.isolated:
                item = self.suspects.popleft()
                self.isolated[i] = item
                self._score(item, i)
                loads[i] += 1
        while self.waiting:
            free = [i for i in range(len(loads)) if i not in self.isolated and loads[i] < SCORE_QUEUE]
            if not free:
                return
            i = min(free, key=loads.__getitem__)
            self._score(self.waiting.popleft(), i)
            loads[i] += 1

    def _score(self, item: tuple[str, int], i: int) -> None:
        assert self.pool is not None
        shard, w = item
        self.pending[self.pool.call(i, "score_window", self.run_dir, shard, w)] = _Call("score", shard, w)

    def describe_waiting(self) -> str:
        calls = list(self.pending.values())
        tasks = sum(c.stage not in ("score", "ready") for c in calls)
        scoring = sum(c.stage == "score" for c in calls)
        loading = sum(v is None for v in self.starting.values())
        starting = f"{loading} scoring actor(s) still starting ({self.starting_hint}); " if loading else ""
        return starting + (
            f"{tasks} task(s) (each asks {self.prepare_resources}) and {scoring} scoring call(s) "
            f"in flight, {len(self.waiting)} window(s) waiting for an actor; free now: {self.executor.available()}. "
            "If this lasts, the cluster cannot place the work: check ray.scorer_resources and the nodes' resources"
        )

    # --- outcomes -----------------------------------------------------------------------------
    def _finished(self, fut: Future) -> None:
        call = self.pending.pop(fut)
        item = (call.shard, call.window)
        if fut.slot is not None and self.pool is not None:
            self.pool.done(fut.slot)
            if self.isolated.get(fut.slot) == item:
                del self.isolated[fut.slot]
        try:
            res = self.executor.result(fut)
        except Exception as e:  # noqa: BLE001 - recorded and reported, never swallowed
            if call.stage == "ready":
                raise  # an actor that cannot load its model (a bad checkpoint) fails the run, now
            if isinstance(e, ActorDied) and call.stage == "score":
                self._replace(fut, e)
                if call.shard in self.result.failed:
                    return  # nothing of that shard is retried
                if self._resubmitted(item):
                    return
                e = RuntimeError(
                    f"its scoring actor died on all {self.deaths[item]} tries, the last ones with this "
                    f"window alone on the actor (a shard that crashes the scorer, or lost nodes): {describe_error(e)}"
                )
            self._fail(call, e)
            return
        if call.shard in self.result.failed:
            return  # another step of this shard failed: what is left of it is not used
        getattr(self, f"_{call.stage}_done")(call, res)

    def _ready_done(self, call: _Call, res: Any) -> None:
        self.starting[call.window] = res
        if all(v is not None for v in self.starting.values()):
            assert self.on_actors_ready is not None
            self.on_actors_ready([self.starting[i] for i in sorted(self.starting)])
            self.starting = {}

    def _prepare_done(self, call: _Call, res: dict) -> None:
        self._record(call.shard, res)
        if res["state"] == "fetch":
            self.flights[call.shard] = _Flight(res["windows"], dict(res["counts"]))
            self.to_fetch.extend((call.shard, w) for w in range(res["windows"]))
            return
        self._end(call.shard)

    def _fetch_done(self, call: _Call, res: dict) -> None:
        f = self.flights[call.shard]
        f.fetched += 1
        f.counts["prepare_s"] = round(f.counts.get("prepare_s", 0) + res["fetch_s"], 3)
        if self.pool is not None and res["ok"]:  # a pool: the run scores its fetched images
            self.waiting.append((call.shard, call.window))
        else:
            f.scored += 1
        self._maybe_finish(call.shard)

    def _score_done(self, call: _Call, res: dict) -> None:
        f = self.flights[call.shard]
        f.scored += 1
        f.reused += bool(res.get("reused"))
        f.counts["score_s"] = round(f.counts.get("score_s", 0) + res["score_s"], 3)
        self._maybe_finish(call.shard)

    def _maybe_finish(self, shard: str) -> None:
        f = self.flights[shard]
        if f.fetched == f.scored == f.windows:
            self._submit(
                _Call("finish", shard), self.steps.finish, self.run_dir, shard, self.spec_json, f.windows, f.counts
            )

    def _finish_done(self, call: _Call, res: dict) -> None:
        f = self.flights.pop(call.shard)
        self._record(call.shard, res)
        if f.reused:
            self.records[call.shard]["windows_reused"] = f.reused
        self._end(call.shard)

    def _record(self, shard: str, res: dict) -> None:
        self.records.setdefault(shard, {}).update(
            {k: v for k, v in res.items() if k not in ("shard", "state", "counts")}
        )

    def _end(self, shard: str) -> None:
        self.result.shards_done.append(shard)
        self.on_shard_end(1)

    def _replace(self, fut: Future, e: ActorDied) -> None:
        """A dead actor took this call down: replace the actor (once, whichever of its calls
        reports first)."""
        assert self.pool is not None and fut.slot is not None
        if self.pool.replace(fut.slot, fut):
            log.warning("scoring actor %d is dead for good (%s); started a fresh one", fut.slot, describe_error(e))

    def _resubmitted(self, item: tuple[str, int]) -> bool:
        """Make a window whose call a dead actor took down a suspect, up to SCORE_RESUBMITS times.
        False when the window has had its resubmissions."""
        self.deaths[item] = self.deaths.get(item, 0) + 1
        if self.deaths[item] <= SCORE_RESUBMITS:  # it may only have been queued behind the culprit
            self.suspects.append(item)
            return True
        return False

    def _fail(self, call: _Call, e: Exception) -> None:
        if call.shard in self.result.failed:
            return  # its first error is the one reported
        self.result.failed[call.shard] = describe_error(e)
        log.error("shard %s failed in %s: %s", call.shard, call.stage, self.result.failed[call.shard])
        self.flights.pop(call.shard, None)
        # its windows not yet fetched or scored are dropped; calls in flight are ignored when they end
        self.to_fetch = deque(x for x in self.to_fetch if x[0] != call.shard)
        self.waiting = deque(x for x in self.waiting if x[0] != call.shard)
        self.suspects = deque(x for x in self.suspects if x[0] != call.shard)
        self.on_shard_end(1)
