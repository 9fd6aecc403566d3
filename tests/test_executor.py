"""The executor interface (curate/executor.py) and the runner's scheduling on it.

- LocalExecutor semantics: tasks run at submit, in order; errors are kept and re-raised; a
  multi-return task gives a list of futures; a crashed actor is restarted, then dead for good
  (ActorDied) until replaced; the Ray dedup engine's shuffle gives the in-process pairs on it.
- ShardScheduler (curate/runner.py) on the LocalExecutor with stand-in stages: an actor that dies
  on a poison shard is replaced, the shards queued behind it are retried, the poison shard alone
  on an idle actor, and it fails by name after SCORE_RESUBMITS resubmissions.
- Composition: prepare + score, a rerun that redoes nothing, a run interrupted after some shards
  and resumed, and `curate forget` followed by a rerun, each on BOTH executors, with the same
  selection on both. The local reference run happens in a subprocess where Ray cannot be
  imported at all: the whole run needs none of it.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.config import PipelineSpec, load_spec
from curate.demo.run_demo import write_inputs
from curate.executor import ActorCrash, ActorDied, Executor, LocalExecutor, Resources
from curate.presets import preset_path
from curate.runner import SCORE_RESUBMITS, RunResult, ShardScheduler, ShardSteps, run
from curate.stages.read import shard_name
from fault_support import REPO, annotations_frame, demo_servers, driver_result, files_state, outcome

ROWS, SHARDS, SEED = 60, 3, 5
NAMES = [f"part-{k:05d}" for k in range(SHARDS)]


# --- the LocalExecutor -----------------------------------------------------------------------


def _three_from(n: int) -> list[int]:
    return [n, n + 1, n + 2]


def _add(a: int, b: int) -> int:
    return a + b


def test_local_tasks_run_in_order_and_keep_their_errors():
    ex = LocalExecutor(cpus=2)
    ok, bad = ex.submit(pow, 2, 10), ex.submit(int, "x")
    assert ex.result(ok) == 1024
    with pytest.raises(ValueError, match="invalid literal"):
        ex.result(bad)
    assert ex.wait_first([bad, ok]) is bad  # everything is settled at submit: the first one given
    parts = ex.submit(_three_from, 5, num_returns=3)
    assert ex.results(parts) == [5, 6, 7]
    (only,) = ex.submit(lambda: ["one"], num_returns=1)  # a one-partition map task is a list too
    assert ex.result(only) == "one"
    assert ex.result(ex.submit(_add, parts[0], parts[2])) == 12  # a future as an argument is its value
    with pytest.raises(ValueError, match="GPU 1"):
        ex.submit(pow, 1, 1, resources=Resources(gpus=1))  # refused, not left waiting
    accel = LocalExecutor(custom={"accel": 1})
    assert accel.result(accel.submit(pow, 3, 2, resources=Resources(custom={"accel": 1}))) == 9


class _Crashy:
    made = 0

    def __init__(self, tag: str):
        type(self).made += 1
        self.tag = tag

    def work(self, what: str) -> str:
        if what == "crash":
            raise ActorCrash("the process died")
        return f"{self.tag}:{what}"


def test_local_actor_restarts_then_dies_until_replaced():
    _Crashy.made = 0
    ex = LocalExecutor()
    pool = ex.actor_pool(_Crashy, ("a",), size=2, resources=Resources(), max_restarts=1)
    assert pool.size == 2 and _Crashy.made == 2
    assert ex.result(pool.call(0, "work", "x")) == "a:x"
    died = pool.call(0, "work", "crash")  # restarted once and retried, then dead for good
    assert _Crashy.made == 3
    with pytest.raises(ActorDied, match="no restarts left"):
        ex.result(died)
    behind = pool.call(0, "work", "y")  # a call queued on a dead actor fails the same way
    with pytest.raises(ActorDied):
        ex.result(behind)
    assert ex.result(pool.call(1, "work", "z")) == "a:z"  # the other slot is fine
    assert pool.loads() == [3, 1]
    pool.done(0)
    assert pool.loads() == [2, 1]
    assert pool.replace(0, died) is True and pool.replaced == 1
    assert pool.replace(0, behind) is False  # the same dead actor, already replaced
    assert ex.result(pool.call(0, "work", "x")) == "a:x"
    assert pool.placement()[0] == {"node_id": "local", "gpu_ids": [], "resources": {"CPU": 1.0}}
    assert pool.call_all("work", "all") == ["a:all", "a:all"]


# --- ShardScheduler with stand-in stages -----------------------------------------------------


def _prepare(path: str, spec_json: str, run_dir: str) -> dict:
    shard = shard_name(path)
    if shard == "part-bad":
        raise ValueError(f"{path} is not a readable parquet file")
    return {"shard": shard, "state": "fetch", "windows": WINDOWS, "counts": {"rows": 3 * WINDOWS}, "rows": 3 * WINDOWS}


def _fetch(run_dir: str, shard: str, window: int, spec_json: str) -> dict:
    return {"window": window, "fetched": 3, "ok": 3, "fetch_s": 0.0}


def _finish(run_dir: str, shard: str, spec_json: str, windows: int, counts: dict) -> dict:
    return {"shard": shard, "state": "done", **counts, "windows": windows}


WINDOWS = 1
STEPS = ShardSteps(_prepare, _fetch, _finish)


class _Scorer:
    """Crashes its process (ActorCrash) on the poison shard, every time; once on a flaky one."""

    crashed: set[str] = set()

    def __init__(self, poison: str, flaky: str = ""):
        self.poison, self.flaky = poison, flaky

    def score_window(self, run_dir: str, shard: str, window: int) -> dict:
        if shard == self.poison or (shard == self.flaky and shard not in _Scorer.crashed):
            _Scorer.crashed.add(shard)
            raise ActorCrash(f"{shard} kills its scorer")
        return {"window": window, "scored": 3, "score_s": 1.0}


def _schedule(pool, paths: list[str], events: list | None = None) -> tuple[RunResult, dict]:
    """Run a ShardScheduler over `paths`; `events` gets ("call", slot, shard, load before) and
    ("done", slot) in order."""
    if events is not None:
        call, done = pool.call, pool.done

        def spy_call(i: int, method: str, *args: Any):
            events.append(("call", i, args[1], pool.loads()[i]))
            return call(i, method, *args)

        def spy_done(i: int) -> None:
            events.append(("done", i))
            done(i)

        pool.call, pool.done = spy_call, spy_done
    result, records = RunResult("rd"), {}
    # every shard admitted at once, so that calls queue behind the poisoned one
    ShardScheduler(LocalExecutor(), STEPS, pool, "{}", "rd", records, result, fetch_slots=8).run(paths)
    return result, records


def test_a_poison_shard_is_retried_alone_then_fails_and_its_actors_are_replaced():
    _Scorer.crashed = set()
    pool = LocalExecutor().actor_pool(_Scorer, ("part-00002",), size=2, resources=Resources(), max_restarts=0)
    events: list = []
    result, records = _schedule(pool, [f"in/part-{k:05d}.parquet" for k in range(6)], events)
    assert list(result.failed) == ["part-00002"]
    assert result.failed["part-00002"].startswith(f"RuntimeError: its scoring actor died on all {SCORE_RESUBMITS + 1}")
    assert "part-00002 kills its scorer" in result.failed["part-00002"]
    assert sorted(result.shards_done) == [f"part-{k:05d}" for k in range(6) if k != 2]
    # prepare's and finish's reports merged; finish got the windows' scoring time
    assert records["part-00000"] == {"rows": 3, "windows": 1, "score_s": 1.0, "prepare_s": 0.0}
    tries = Counter(e[2] for e in events if e[0] == "call")
    assert tries.pop("part-00002") == SCORE_RESUBMITS + 1
    assert sorted(tries.values()) == [1, 1, 1, 1, 2]  # one innocent shard went down with the poisoned actor
    poison = [i for i, e in enumerate(events) if e[0] == "call" and e[2] == "part-00002"]
    for k in poison[1:]:  # each retry alone: an idle actor, and nothing else sent there until it ends
        _, slot, _, load = events[k]
        assert load == 0
        assert next(e for e in events[k + 1 :] if e[1] == slot) == ("done", slot)
    assert pool.replaced == SCORE_RESUBMITS + 1  # one fresh actor per death, however many calls it took
    assert pool.loads() == [0, 0]


def test_a_crash_with_restarts_left_is_retried_by_the_actor():
    _Scorer.crashed = set()
    pool = LocalExecutor().actor_pool(_Scorer, ("", "part-00001"), size=1, resources=Resources(), max_restarts=1)
    result, _ = _schedule(pool, [f"in/part-{k:05d}.parquet" for k in range(3)])
    assert result.ok and sorted(result.shards_done) == NAMES
    assert _Scorer.crashed == {"part-00001"} and pool.replaced == 0


def test_a_stage_error_is_recorded_and_the_others_go_on():
    pool = LocalExecutor().actor_pool(_Scorer, ("",), size=1, resources=Resources())
    result, _ = _schedule(pool, ["in/part-00000.parquet", "in/part-bad.parquet", "in/part-00001.parquet"])
    assert result.failed == {"part-bad": "ValueError: in/part-bad.parquet is not a readable parquet file"}
    assert sorted(result.shards_done) == ["part-00000", "part-00001"]


def test_one_big_shard_is_scored_while_it_is_fetched_and_by_every_actor():
    """A shard of 6 windows on 2 actors: scoring starts on window 0 before the last window is
    fetched, both actors score part of it, and finish runs once, after every window, with the
    windows' fetch and scoring figures summed into its counts."""
    log: list[tuple] = []

    def prepare(path, spec_json, run_dir):
        return {"shard": "big", "state": "fetch", "windows": 6, "counts": {"rows": 60}, "rows": 60}

    def fetch(run_dir, shard, window, spec_json):
        log.append(("fetch", window))
        return {"window": window, "fetched": 10, "ok": 0 if window == 4 else 10, "fetch_s": 0.5}

    def finish(run_dir, shard, spec_json, windows, counts):
        log.append(("finish", windows))
        return {"shard": shard, "state": "done", **counts}

    class Scorer:
        def score_window(self, run_dir, shard, window):
            log.append(("score", window))
            return {"window": window, "scored": 10, "score_s": 2.0}

    pool = LocalExecutor().actor_pool(Scorer, (), size=2, resources=Resources())
    slots: list[int] = []
    call = pool.call
    pool.call = lambda i, method, *a: (slots.append(i), call(i, method, *a))[1]
    result, records = RunResult("rd"), {}
    ShardScheduler(LocalExecutor(), ShardSteps(prepare, fetch, finish), pool, "{}", "rd", records, result).run(
        ["in/big.parquet"]
    )
    assert result.ok and result.shards_done == ["big"]
    assert log.index(("score", 0)) < log.index(("fetch", 5))  # streaming: no wait for the whole shard
    assert sorted(w for s, w in log if s == "score") == [0, 1, 2, 3, 5]  # window 4 fetched no image
    assert set(slots) == {0, 1}  # split across the actors
    assert log[-1] == ("finish", 6) and sum(s == "finish" for s, _ in log) == 1
    assert records["big"] == {"rows": 60, "prepare_s": 3.0, "score_s": 10.0, "windows": 6}


def test_shards_are_fetched_while_the_models_load(ray_session, tmp_path):
    """On Ray, a shard is prepared and its windows fetched while the scoring actors still load
    their models: the stand-in actors' describe() returns only once a fetch has written its file
    (it gives up after 60 s, failing the run), and windows reach the actors only after that."""
    from curate.config import RayConfig
    from curate.ray_adapter import RayExecutor

    flag = str(tmp_path / "fetched")

    def prepare(path, spec_json, run_dir):
        return {"shard": "big", "state": "fetch", "windows": 3, "counts": {"rows": 30}, "rows": 30}

    def fetch(run_dir, shard, window, spec_json):
        Path(flag).write_text("x")
        return {"window": window, "fetched": 10, "ok": 10, "fetch_s": 0.1}

    def finish(run_dir, shard, spec_json, windows, counts):
        return {"shard": shard, "state": "done", **counts}

    class Loading:
        def __init__(self):
            self.ready = False

        def describe(self):
            import time

            deadline = time.monotonic() + 60
            while not Path(flag).exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("no window was fetched while the model loaded")
                time.sleep(0.05)
            self.ready = True
            return {"model_id": "stand-in"}

        def score_window(self, run_dir, shard, window):
            assert self.ready, "a window reached an actor before it had loaded"
            return {"window": window, "scored": 10, "score_s": 0.1}

    ex = RayExecutor(RayConfig())
    pool = ex.actor_pool(Loading, (), size=2, resources=Resources(cpus=0.1))
    ready: list = []
    result, records = RunResult("rd"), {}
    try:
        ShardScheduler(
            ex, ShardSteps(prepare, fetch, finish), pool, "{}", "rd", records, result, on_actors_ready=ready.append
        ).run(["in/big.parquet"])
    finally:
        pool.close()
    assert result.ok and result.shards_done == ["big"], result.failed
    assert ready == [[{"model_id": "stand-in"}] * 2]  # once, with every actor's description
    assert records["big"]["windows"] == 3 and records["big"]["score_s"] == pytest.approx(0.3)


def test_an_actor_that_cannot_load_fails_the_run_at_once():
    """describe() raising (a bad checkpoint) ends the run with that error, not as a shard failure."""

    class Broken:
        def describe(self):
            raise ValueError("checkpoint /x.pt: not a state dict")

        def score_window(self, run_dir, shard, window):  # pragma: no cover - never reached
            raise AssertionError("scored with a model that did not load")

    pool = LocalExecutor().actor_pool(Broken, (), size=1, resources=Resources())
    sched = ShardScheduler(
        LocalExecutor(), STEPS, pool, "{}", "rd", {}, RunResult("rd"), on_actors_ready=lambda d: None
    )
    with pytest.raises(ValueError, match="not a state dict"):
        sched.run(["in/part-00000.parquet"])


# --- composition: whole runs on both executors ----------------------------------------------

NO_RAY_DRIVER = r"""
import importlib.abc, json, sys, traceback

refused = []


class NoRay(importlib.abc.MetaPathFinder):
    '''Ray cannot be imported here; who tried is recorded (img2dataset probes for it, optionally).'''

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            frames = [f.filename for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            refused.append(frames[-1])
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None


sys.meta_path.insert(0, NoRay())
from curate.config import PipelineSpec
from curate.executor import LocalExecutor
from curate.runner import run

with open(sys.argv[1]) as f:
    res = run(PipelineSpec.model_validate_json(f.read()), executor=LocalExecutor())
out = {"ok": res.ok, "failed": res.failed, "done": sorted(res.shards_done)}
out.update({"ray_loaded": "ray" in sys.modules, "refused": refused})
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("executor")
    with demo_servers() as servers:
        write_inputs(base, ROWS, SHARDS, SEED, servers)
        yield {"base": base, "servers": servers}


def _spec(world, out: Path) -> PipelineSpec:
    return load_spec(preset_path("demo")).with_overrides(
        **{"input.paths": [str(world["base"] / "input" / "shards")], "output.dir": str(out)}
    )


def _hits(world) -> int:
    return sum(sum(s.hits.values()) for s in world["servers"].values())


@pytest.fixture(scope="module")
def reference(world) -> Path:
    """A clean run on the LocalExecutor, in a process where Ray cannot be imported."""
    out = world["base"] / "reference"
    spec_file = world["base"] / "reference.json"
    spec_file.write_text(_spec(world, out).model_dump_json())
    res = driver_result(NO_RAY_DRIVER, str(spec_file), timeout=300)
    assert res["ok"] and res["done"] == NAMES, res
    assert res["ray_loaded"] is False
    assert not [f for f in res["refused"] if f.startswith(str(REPO / "curate"))], res["refused"]
    return out


@pytest.fixture(params=["local", "ray"])
def executor(request) -> Executor:
    if request.param == "local":
        return LocalExecutor()
    request.getfixturevalue("ray_session")  # the session's Ray, joined
    from curate.config import RayConfig
    from curate.ray_adapter import RayExecutor

    return RayExecutor(RayConfig())


def _assert_same(run_dir: Path, reference: Path) -> None:
    """The same decisions, scores and annotations as the reference run, every row once."""
    got = outcome(run_dir)
    assert got.height == ROWS and got.select("shard", "row").n_unique() == ROWS
    assert got.equals(outcome(reference)), "decisions or scores differ from the reference run"
    assert annotations_frame(run_dir).equals(annotations_frame(reference))


@pytest.fixture(scope="module")
def clean_runs() -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module")
def spare_runs() -> dict[str, Path]:
    """Complete runs that a later test may change (the forget test takes a resumed run, one run
    less per executor); a test that finds none here makes its own."""
    return {}


@pytest.fixture
def clean(world, executor, clean_runs) -> Path:
    """A clean run on `executor`, made once per executor in this module."""
    kind = type(executor).__name__
    if kind not in clean_runs:
        out = world["base"] / f"clean-{kind}"
        res = run(_spec(world, out), executor=executor)
        assert res.ok and sorted(res.shards_done) == NAMES, res.failed
        clean_runs[kind] = out
    return clean_runs[kind]


def test_prepare_and_score_give_the_same_selection(clean, reference, executor):
    _assert_same(clean, reference)
    m = json.loads((clean / "manifest.json").read_text())
    assert m["state"] == "complete" and m["counts"]["shards_complete"] == SHARDS
    assert m["model"]["model"] == "curate-tiny" and m["counts"]["scored"] > 0
    assert {k: m["cluster"][k] for k in ("address", "cpus", "gpus", "nodes")} == executor.cluster.as_dict()
    assert m["cluster"]["scorer_placement"][0]["resources"]["CPU"] == 1.0  # the runner's declaration
    assert len(m["cluster"]["scorer_nodes"]) == 1 and m["cluster"]["scorer_replacements"] == 0
    assert sorted(m["shards"]) == NAMES and all(s["fetch_attempted"] > 0 for s in m["shards"].values())


def test_a_second_run_redoes_nothing(world, clean, reference, executor):
    before, hits = files_state(clean, NAMES), _hits(world)
    res = run(_spec(world, clean), executor=executor)
    assert res.ok and sorted(res.shards_done) == NAMES
    assert _hits(world) == hits  # nothing fetched
    assert files_state(clean, NAMES) == before  # no shard rewritten
    _assert_same(clean, reference)


class _Interrupting(Executor):
    """`inner`, with a Ctrl-C at the `at`-th result the runner collects (a driver stopped mid-run).
    Keeps the task futures, so that the test can let what was in flight end before resuming."""

    def __init__(self, inner: Executor, at: int):
        self.inner, self.at, self.cluster = inner, at, inner.cluster
        self.collected, self.tasks = 0, []

    def submit(self, fn, *args, resources=Resources(), num_returns=None):
        f = self.inner.submit(fn, *args, resources=resources, num_returns=num_returns)
        self.tasks.append(f)
        return f

    def wait_first(self, futures):
        return self.inner.wait_first(futures)

    def result(self, future):
        self.collected += 1
        if self.collected == self.at:
            raise KeyboardInterrupt
        return self.inner.result(future)

    def actor_pool(self, cls, args, size, resources, max_restarts=3):
        return self.inner.actor_pool(cls, args, size, resources, max_restarts)


def test_an_interrupted_run_resumes_to_the_same_result(world, reference, executor, spare_runs):
    out = world["base"] / f"interrupted-{type(executor).__name__}"
    stopped = _Interrupting(executor, at=8)
    with pytest.raises(KeyboardInterrupt):
        run(_spec(world, out), executor=stopped)
    for f in stopped.tasks:  # what was still running ends before the resume (a killed driver's would die)
        with contextlib.suppress(Exception):
            executor.result(f)
    assert json.loads((out / "manifest.json").read_text())["state"] == "interrupted"
    finished = sorted(p.stem for p in (out / "annotations").glob("*.done"))
    assert len(finished) < SHARDS
    if isinstance(executor, LocalExecutor):  # deterministic: shard 0's finish ran when submitted, at the 7th result
        assert finished == ["part-00000"]
    before = files_state(out, finished)
    res = run(_spec(world, out), executor=executor)
    assert res.ok and sorted(res.shards_done) == NAMES, res.failed
    assert files_state(out, finished) == before  # the shards finished before the stop were not redone
    _assert_same(out, reference)
    spare_runs[type(executor).__name__] = out


def test_forgotten_rows_do_not_come_back_in_a_rerun(world, reference, executor, spare_runs, tmp_path):
    out = spare_runs.pop(type(executor).__name__, None)
    if out is None:
        out = world["base"] / f"forget-{type(executor).__name__}"
        assert run(_spec(world, out), executor=executor).ok
    # two kept rows that no removed row is a duplicate of: forgetting them changes no other decision
    dup_of = set(pl.read_parquet(out / "selections" / "default" / "removed" / "*.parquet")["duplicate_of"].drop_nulls())
    kept = outcome(out).filter(pl.col("kept") & ~pl.col("uid").is_in(list(dup_of)))
    gone = {kept["uid"][0], kept["uid"][-1]}
    (tmp_path / "uids.txt").write_text("\n".join(sorted(gone)) + "\n")
    res = CliRunner().invoke(app, ["forget", str(out), "--uids", str(tmp_path / "uids.txt")])
    assert res.exit_code == 0, res.output
    after_forget = outcome(out)
    assert after_forget.height == ROWS - 2 and not set(after_forget["uid"]) & gone

    res = run(_spec(world, out), executor=executor)  # re-reads every input shard's state
    assert res.ok
    again = outcome(out)
    assert again.equals(after_forget)
    ann = pl.read_parquet(out / "annotations" / "*.parquet")
    assert ann.height == ROWS - 2 and not set(ann["uid"]) & gone
    want = outcome(reference).filter(~pl.col("uid").is_in(list(gone)))
    assert again.equals(want)  # everything else as in the reference run
