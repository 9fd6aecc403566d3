"""`curate run`: drive every input shard through prepare (CPU tasks) and scoring (actors) on Ray,
then write the spec's default selection. Shards flow through as they finish (fetching shard k+1
overlaps scoring shard k); a failed shard is recorded with its error and its row count (from the
parquet footer when that is readable, else "unknown") as unaccounted, and the run exits
non-zero, but never hides or stops the other shards. A worker, node or actor that dies is Ray's
to retry (curate/ray_adapter.py); a killed driver is resumed by running the same command again:
shards with a completion marker are not redone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from curate import annotations, faults, io, manifest, publish, selection
from curate import run_dir as run_dir_mod
from curate.config import PipelineSpec
from curate.stages.read import footer_rows, list_shards, shard_name
from tqdm import tqdm
from curate.stages.annotate import LANGUAGE_MODEL_ID
from curate.annotations import ANNOTATION_COLUMNS
from curate import run_lock

log = logging.getLogger(__name__)

SCORE_QUEUE = 2  # scoring calls in flight per actor: one running, one ready to start
SCORE_RESUBMITS = 2  # times a shard is resubmitted after a dead actor took its call down


@dataclass
class RunResult:
    run_dir: str
    shards_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    selection: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def run(spec: PipelineSpec) -> RunResult:
    """The whole `curate run`, holding the run directory's writer lock (curate/run_lock.py): a
    second writer is refused, naming this one. The manifest says "complete" only once the
    selection is in place; a Ctrl-C leaves it "interrupted", a crash "failed" (with the error)."""
    run_dir = spec.output.dir
    preflight(spec)
    run_dir_mod.check_output_dir(run_dir)  # before the lock file is made: a foreign folder stays untouched
    with run_lock.hold(run_dir):
        return _run(spec)


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


def _run(spec: PipelineSpec) -> RunResult:
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
        return _run_shards(spec, m, shards)
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


def _run_shards(spec: PipelineSpec, m: dict, shards: list[str]) -> RunResult:
    from curate import ray_adapter as rx
    from curate.selection import write_selection
    from curate.shard_jobs import ShardScorer, prepare_shard

    run_dir = spec.output.dir
    info = rx.connect(spec.ray)
    m["cluster"] = info.as_dict()
    spec_json = spec.model_dump_json()
    result = RunResult(run_dir)

    pool = None
    if spec.score.source == "model" and spec.fetch.enabled:
        # one GPU per scoring actor when the cluster has any (tests/test_gpu_placement.py)
        gpus = rx.gpus_per_scorer(info)
        pool = rx.ActorPool(
            ShardScorer,
            (spec_json,),
            size=spec.score.actors,
            gpus_per_actor=gpus,
            cpus_per_actor=1,
            resources=spec.ray.scorer_resources,
            max_restarts=spec.ray.scorer_max_restarts,
        )
        m["model"] = pool.call_all("describe")[0]  # also fails fast on a bad checkpoint
        m["cluster"]["scorer_nodes"] = pool.node_ids()
        m["cluster"]["scorer_placement"] = pool.placement()  # node, GPU ids and resources per actor
        manifest.write(run_dir, m)
    elif spec.score.source == "column":
        m["model"] = {"model_id": f"input-column:{spec.score.column}"}

    m["language_model"] = LANGUAGE_MODEL_ID if spec.annotate.language else None

    prepare = rx.cpu_task(prepare_shard)
    paths = {shard_name(p): p for p in shards}
    # ref -> (stage, shard, actor index or -1, actor handle or None)
    by_ref = {prepare.remote(p, spec_json, run_dir): ("prepare", shard_name(p), -1, None) for p in shards}
    prepared: dict[str, dict] = {}  # shard -> its prepare counts, to resubmit a scoring call
    deaths: dict[str, int] = {}  # shard -> its scoring calls that a dead actor took down
    waiting: list[str] = []  # prepared shards not yet sent to an actor
    suspects: list[str] = []  # shards whose call died with an actor: each is retried ALONE on an actor
    isolated: dict[int, str] = {}  # actor slot -> the suspect it is running, nothing else queued there

    def dispatch() -> None:
        """Send waiting shards to actors, at most SCORE_QUEUE calls per actor so that work goes to
        whichever frees up first and a dying actor takes few calls down with it. A suspect runs
        alone on an idle actor: if that actor dies, the suspect killed it, and no innocent shard
        queued behind it is taken down again."""
        assert pool is not None
        loads = pool.loads()
        for i in range(len(loads)):
            if suspects and loads[i] == 0 and i not in isolated:
                shard = suspects.pop(0)
                isolated[i] = shard
                submit(shard, i)
                loads[i] += 1
        while waiting:
            free = [i for i in range(len(loads)) if i not in isolated and loads[i] < SCORE_QUEUE]
            if not free:
                return
            i = min(free, key=loads.__getitem__)
            submit(waiting.pop(0), i)
            loads[i] += 1

    def submit(shard: str, i: int) -> None:
        sref = pool.submit_to(i, "score_shard", run_dir, shard, prepared[shard])
        by_ref[sref] = ("score", shard, i, pool.handle(i))

    def finished(ref) -> None:
        kind, shard, actor, handle = by_ref.pop(ref)
        if actor >= 0 and pool is not None:
            pool.done(actor)
            if isolated.get(actor) == shard:
                del isolated[actor]
        try:
            res = rx.get(ref)
        except Exception as e:  # noqa: BLE001 - recorded and reported, never swallowed
            if kind == "score" and pool is not None and rx.is_actor_dead(e):
                if pool.replace(actor, handle):
                    log.warning(
                        "scoring actor %d is dead for good (%s); started a fresh one", actor, rx.describe_error(e)
                    )
                deaths[shard] = deaths.get(shard, 0) + 1
                if deaths[shard] <= SCORE_RESUBMITS:  # it may only have been queued behind the culprit
                    suspects.append(shard)
                    return
                e = RuntimeError(
                    f"its scoring actor died on all {deaths[shard]} tries, the last ones with this "
                    f"shard alone on the actor (a shard that crashes the scorer, or lost nodes): "
                    f"{rx.describe_error(e)}"
                )
            result.failed[shard] = rx.describe_error(e)
            log.error("shard %s failed in %s: %s", shard, kind, result.failed[shard])
            bar.update(1)
            return
        m["shards"].setdefault(shard, {}).update(
            {k: v for k, v in res.items() if k not in ("shard", "state", "counts")}
        )
        if res["state"] == "needs_scoring":
            prepared[shard] = res["counts"]
            waiting.append(shard)
            return
        result.shards_done.append(shard)
        bar.update(1)

    with _progress(len(shards)) as bar:
        while by_ref:
            ready, _ = rx.wait_one(by_ref)
            finished(ready[0])
            if pool is not None:
                dispatch()
    assert not waiting and not suspects, (waiting, suspects)  # every prepared shard went to an actor
    if pool is not None:
        m["cluster"]["scorer_replacements"] = pool.replaced
        pool.kill()

    m["failed_shards"] = result.failed
    m["unaccounted_rows"] = {s: footer_rows(paths[s]) for s in sorted(result.failed)}
    done = annotations.completed_shards(run_dir)
    m["counts"] = _totals(run_dir, done)
    m["state"] = "selecting"  # shards done; "complete" only once the selection is in place
    manifest.write(run_dir, m)
    faults.fire("run.before_selection", run_dir)
    if done:
        result.selection = write_selection(run_dir, spec.selection, spec.report)
    recorded = manifest.read(run_dir)  # write_selection recorded the selection and the output checksums
    m.update({k: recorded[k] for k in ("selections", "selection_specs", "outputs") if k in recorded})
    m["state"] = "failed" if result.failed else "complete"
    m["finished_at"] = manifest.now()
    manifest.write(run_dir, m)
    return result


def _totals(run_dir: str, shards: list[str]) -> dict:
    """Counts per stage over completed shards, from their markers: rows read, rows that passed
    the text rules and were fetched (this run), fetched OK, and rows holding a score."""
    tot: dict = {
        "shards_complete": len(shards),
        "rows": 0,
        "forgotten": 0,
        "fetch_attempted": 0,
        "fetch_ok": 0,
        "scored": 0,
        "fetch_status": {},
    }
    for s in shards:
        mk = io.read_json(annotations.marker_path(run_dir, s))
        for key in ("rows", "forgotten", "fetch_attempted", "fetch_ok", "scored"):  # forgotten: curate forget
            tot[key] += int(mk.get(key, 0))
        for k, v in mk["fetch_status"].items():
            tot["fetch_status"][k] = tot["fetch_status"].get(k, 0) + v
    return tot


def _progress(total: int):
    from curate.ray_adapter import progress_disabled

    return tqdm(total=total, desc="shards", unit="shard", disable=progress_disabled())
