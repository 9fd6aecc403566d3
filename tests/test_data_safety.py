"""Nothing lost, ever: names that are path components are refused, `--overwrite` removes only what
curate wrote, one writer per run directory (a second is refused, naming the holder), selections are
swapped in whole (a SIGKILL at any step leaves the old selection or the new one, complete), and the
manifest says "complete" only once the selection is in place. Every check reads the bytes on disk.

Real processes throughout: the `curate` command in subprocesses, killed with SIGKILL by the kill
points in curate/faults.py, on the real LAION sample with real (local) Ray."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fault_support import kill_session, run_in_session

CURATE = str(Path(sys.executable).with_name("curate"))
SHARDS = 3
ROWS = 1200


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CURATE_PROGRESS": "0", "RAY_AUTH_MODE": "disabled", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _start(*args: str, **env: str) -> subprocess.Popen:
    """The real `curate` command, started in a process session of its own (so that _kill_group
    ends whatever it started)."""
    return subprocess.Popen(
        [CURATE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        start_new_session=True,
    )


def curate(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run the real `curate` command to its end; nothing it started outlives it."""
    return run_in_session([CURATE, *args], _env(**env), timeout)


def _paused_run(base_run, run, seconds: int) -> subprocess.Popen:
    """`curate run laion_sample` into `run`, holding the directory's lock and pausing `seconds`
    just before its selection (curate/faults.py CURATE_PAUSE)."""
    return _start(
        "run",
        "laion_sample",
        "--input",
        str(base_run["input"]),
        "--out",
        str(run),
        CURATE_PAUSE=f"run.before_selection={seconds}",
    )


def _kill_group(p: subprocess.Popen) -> None:
    """Everything the command started (Ray's processes too), then the command itself."""
    kill_session(p.pid)
    if p.poll() is None:
        p.kill()
        p.wait()


def digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


def check_complete(sel: Path) -> dict:
    """A whole, reconciling selection: selection.json, uids, report, and per shard its kept and
    removed files, which hold exactly the counts selection.json states. Returns selection.json."""
    assert sel.is_dir(), f"{sel} is missing"
    summary = json.loads((sel / "selection.json").read_text())
    assert summary["reconciles"] is True
    assert (sel / "report.html").stat().st_size > 0 and json.loads((sel / "report.json").read_text())["reconciles"]
    shards = sorted(summary["shards"])
    assert sorted(p.stem for p in (sel / "kept").glob("*.parquet")) == shards
    assert sorted(p.stem for p in (sel / "removed").glob("*.parquet")) == shards
    kept = pl.read_parquet(sel / "kept" / "*.parquet")
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    assert kept.height == summary["counts"]["kept"] and removed.height == summary["counts"]["removed"]
    assert kept.height + removed.height == summary["counts"]["rows"]
    for s in shards:
        c = summary["shards"][s]
        assert pl.read_parquet(sel / "kept" / f"{s}.parquet").height == c["kept"]
        assert pl.read_parquet(sel / "removed" / f"{s}.parquet").height == c["removed"]
    uids = np.load(sel / "uids.npy")
    assert len(uids) == kept.height
    return summary


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, laion_sample):
    """A finished fetch-off run of 1,200 real LAION rows in 3 shards (`curate run`, subprocess)."""
    root = tmp_path_factory.mktemp("safety")
    inp = root / "input"
    inp.mkdir()
    src = pl.read_parquet(laion_sample).head(ROWS)
    for k in range(SHARDS):
        src.slice(k * ROWS // SHARDS, ROWS // SHARDS).write_parquet(inp / f"part-{k}.parquet")
    run = root / "run"
    res = curate("run", "laion_sample", "--input", str(inp), "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    check_complete(run / "selections" / "default")
    return {"root": root, "input": inp, "run": run}


def _copy_run(base_run, dst: Path) -> Path:
    import shutil

    shutil.copytree(base_run["run"], dst, symlinks=True)
    return dst


# --- 1. names that are path components -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", ".hidden", "-x"])
def test_selection_names_that_are_paths_are_refused_and_nothing_changes(base_run, tmp_path, name):
    run = _copy_run(base_run, tmp_path / "run")
    (run / "forget").mkdir(exist_ok=True)
    (run / "forget" / "keys.parquet").write_bytes(b"stand-in for the deletion keys")
    before = digest(run, skip=(".curate.lock",))
    res = curate("select", str(run), "--name", name, "--min-words", "5")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "selection name" in res.stderr and "not allowed" in res.stderr
    res = curate("report", str(run), "--selection", name)
    assert res.returncode == 2 and "not allowed" in res.stderr, res.stderr
    assert digest(run, skip=(".curate.lock",)) == before  # every byte where it was


def test_spec_with_a_path_selection_name_is_refused(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n[input]\npaths = ["in"]\n[selection]\nname = ".."\n')
    res = curate("show-spec", str(spec))
    assert res.returncode == 2 and "selection.name" in res.stderr, res.stderr


# --- 2. --overwrite removes only what curate wrote --------------------------------------------------
def test_overwrite_removes_only_curates_files(base_run, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    mine = {
        "notes.txt": b"my notes",
        "annotations/README": b"mine",
        "selections/default/extra.csv": b"a,b\n",
        "selections/mine/list.csv": b"x\n",
        "data/raw.parquet": b"not curate's",
    }
    for rel, data in mine.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    (run / "forget").mkdir()  # deletion keys (a uid no row has): they outlive every --overwrite
    pl.DataFrame({"kind": ["uid"], "key": ["0" * 32]}).write_parquet(run / "forget" / "keys.parquet")
    mine["forget/keys.parquet"] = (run / "forget" / "keys.parquet").read_bytes()
    # a selection folder with a file curate did not write is not replaced ...
    res = curate("select", str(run), "--name", "default", "--min-words", "5")
    assert res.returncode == 2 and "extra.csv" in res.stderr and "did not write" in res.stderr, res.stderr
    # ... nor by a run, which says so before it starts (not after all its shards)
    before = digest(run, skip=(".curate.lock",))
    res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(run), "--overwrite")
    assert res.returncode == 2 and "extra.csv" in res.stderr, res.stderr
    assert digest(run, skip=(".curate.lock",)) == before
    (run / "selections" / "default" / "extra.csv").rename(run / "extra.csv")  # as the message says
    del mine["selections/default/extra.csv"]
    mine["extra.csv"] = b"a,b\n"
    # --overwrite removes curate's files around the user's, never theirs nor forget/
    res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(run), "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    for rel, data in mine.items():
        assert (run / rel).read_bytes() == data, rel
    assert "left" in res.stderr and "notes.txt" in res.stderr  # says what it left
    m = json.loads((run / "manifest.json").read_text())
    assert m["state"] == "complete"


def test_a_folder_that_is_not_a_curate_run_is_refused(base_run, tmp_path):
    # not empty, no manifest
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = digest(out)
    for extra in ([], ["--overwrite"]):
        res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(out), *extra)
        assert res.returncode == 2 and "not a curate run directory" in res.stderr, res.stderr
        assert digest(out) == before and not (out / ".curate.lock").exists()
    # a manifest.json that is not curate's, or not JSON
    for body in (b'{"name": "my project"}', b"\x00garbage"):
        (out / "manifest.json").write_bytes(body)
        before = digest(out)
        res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(out), "--overwrite")
        assert res.returncode == 2 and "manifest.json" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert digest(out) == before
    # --out is a file
    f = tmp_path / "file.txt"
    f.write_text("x")
    res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(f))
    assert res.returncode == 2 and "is a file" in res.stderr, res.stderr
    assert f.read_text() == "x"


def test_corrupt_manifest_is_named_by_select(base_run, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    (run / "manifest.json").write_text("")
    res = curate("select", str(run), "--name", "x")
    assert res.returncode == 2 and "manifest.json" in res.stderr and "Traceback" not in res.stderr, res.stderr


# --- 3. one writer per run directory ------------------------------------------------------------------
def _wait_holder(run: Path, pid: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = json.loads((run / ".curate.lock").read_text())
            if h.get("pid") == pid:
                return h
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} never took the lock of {run}")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_two_selects_one_proceeds_the_other_is_refused(base_run, tmp_path, trial):
    run = _copy_run(base_run, tmp_path / "run")
    first = _start(
        "select", str(run), "--name", "default", "--min-words", str(4 + trial), CURATE_PAUSE="selection.start=6"
    )
    try:
        _wait_holder(run, first.pid)
        second = curate("select", str(run), "--name", "default", "--min-words", "9")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr and "curate select" in second.stderr and "in use by" in second.stderr
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        _kill_group(first)
    summary = check_complete(run / "selections" / "default")
    assert summary["rules"]["caption"]["min_words"] == 4 + trial  # the refused one changed nothing


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_run_and_select_one_proceeds_the_other_is_refused(base_run, tmp_path, trial):
    run = _copy_run(base_run, tmp_path / "run")
    if trial % 2 == 0:  # the run holds the directory; a select comes in
        holder = _paused_run(base_run, run, 8)
        other = ("select", str(run), "--name", "default", "--min-words", "9")
        what = "curate run"
    else:  # a select holds it; a run comes in
        holder = _start("select", str(run), "--name", "default", "--min-words", "6", CURATE_PAUSE="selection.start=8")
        other = ("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(run))
        what = "curate select"
    try:
        _wait_holder(run, holder.pid)
        res = curate(*other)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"pid {holder.pid}" in res.stderr and what in res.stderr, res.stderr
        out, err = holder.communicate(timeout=300)
        assert holder.returncode == 0, err[-3000:]
    finally:
        _kill_group(holder)
    summary = check_complete(run / "selections" / "default")
    assert summary["rules"]["caption"]["min_words"] != 9
    assert json.loads((run / "manifest.json").read_text())["state"] == "complete"


# --- 4. selections swapped in whole: SIGKILL at every step --------------------------------------------
KILL_POINTS = [
    "selection.start",
    "selection.shard_written",
    "selection.uids_written",
    "selection.report_written",
    "selection.json_written",
    "publish.before_swap",
    "publish.after_swap",
    "publish.after_cleanup",
    "selection.before_manifest",
    "selection.after_manifest",
]
SWAPPED = KILL_POINTS.index("publish.after_swap")  # from here on the new selection is in place


@pytest.mark.slow
def test_sigkill_at_every_step_of_curate_select(base_run, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    sel = run / "selections" / "default"
    old = check_complete(sel)["rules"]["caption"]["min_words"]
    for i, point in enumerate(KILL_POINTS):
        new = old + 1 + i % 3
        res = curate(
            "select",
            str(run),
            "--name",
            "default",
            "--min-words",
            str(new),
            CURATE_FAILPOINT=f"{point}:{tmp_path / f'once-{i}'}",
        )
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-2000:])
        got = check_complete(sel)["rules"]["caption"]["min_words"]  # old or new, whole, never a mixture
        assert got == (new if i >= SWAPPED else old), (point, got, old, new)
        old = got
    res = curate("select", str(run), "--name", "default", "--min-words", "8")  # a rerun completes it
    assert res.returncode == 0, res.stderr[-2000:]
    assert check_complete(sel)["rules"]["caption"]["min_words"] == 8
    assert not [p.name for p in (run / "selections").iterdir() if p.name.startswith(".")]  # staging tidied
    m = json.loads((run / "manifest.json").read_text())
    assert m["selection_specs"]["default"]["caption"]["min_words"] == 8


@pytest.mark.slow
def test_sigkill_while_the_ray_engine_selects(base_run, tmp_path):
    """selection.engine = "ray": blocks decided and shard files written by Ray tasks, uids.npy
    streamed by the driver. A SIGKILL of the driver in the middle leaves the previous selection of
    that name whole; a rerun completes it, and it is the local engine's selection."""
    run = _copy_run(base_run, tmp_path / "run")
    sel = run / "selections" / "default"
    old = check_complete(sel)["rules"]["caption"]["min_words"]
    for i, point in enumerate(["selection.shard_written", "selection.uids_written", "publish.before_swap"]):
        res = curate(
            "select", str(run), "--name", "default", "--engine", "ray", "--min-words", str(old + 1),
            CURATE_FAILPOINT=f"{point}:{tmp_path / f'once-{i}'}",
        )  # fmt: skip
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-2000:])
        assert check_complete(sel)["rules"]["caption"]["min_words"] == old, point  # the old one, whole
    res = curate("select", str(run), "--name", "default", "--engine", "ray", "--min-words", str(old + 1))
    assert res.returncode == 0, res.stderr[-2000:]
    got = check_complete(sel)
    assert got["rules"]["caption"]["min_words"] == old + 1 and got["rules"]["engine"] == "ray"
    res = curate("select", str(run), "--name", "local", "--engine", "local", "--min-words", str(old + 1))
    assert res.returncode == 0, res.stderr[-2000:]
    local = run / "selections" / "local"
    for sub in ("kept", "removed"):
        a = pl.read_parquet(sel / sub / "*.parquet").sort("shard", "row")
        assert a.equals(pl.read_parquet(local / sub / "*.parquet").sort("shard", "row")), sub
    assert (sel / "uids.npy").read_bytes() == (local / "uids.npy").read_bytes()
    assert not [p.name for p in (run / "selections").iterdir() if p.name.startswith(".")]  # staging tidied


@pytest.mark.slow
def test_sigkill_in_the_selection_phase_of_curate_run(base_run, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    sel = run / "selections" / "default"
    spec = tmp_path / "spec.toml"
    base = (Path(__file__).resolve().parent.parent / "pipelines" / "laion_sample.toml").read_text()
    old = check_complete(sel)["rules"]["caption"]["min_words"]
    for i, point in enumerate(["run.before_selection", *KILL_POINTS]):
        new = old + 1 + i % 3
        spec.write_text(base.replace("min_words = 3", f"min_words = {new}"))
        res = curate(  # in-process executor: the kill points are the driver's; no Ray start per kill
            "run",
            str(spec),
            "--input",
            str(base_run["input"]),
            "--out",
            str(run),
            "--executor",
            "local",
            CURATE_FAILPOINT=f"{point}:{tmp_path / f'once-{i}'}",
        )
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-2000:])
        got = check_complete(sel)["rules"]["caption"]["min_words"]
        swapped = point != "run.before_selection" and KILL_POINTS.index(point) >= SWAPPED
        assert got == (new if swapped else old), (point, got, old, new)
        assert json.loads((run / "manifest.json").read_text())["state"] != "complete", point  # not before it is
        old = got
    spec.write_text(base.replace("min_words = 3", "min_words = 9"))
    res = curate("run", str(spec), "--input", str(base_run["input"]), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert check_complete(sel)["rules"]["caption"]["min_words"] == 9
    assert json.loads((run / "manifest.json").read_text())["state"] == "complete"


def test_select_without_atomic_exchange_recovers_a_parked_selection(base_run, tmp_path):
    """Where the filesystem cannot exchange two folders, the old selection is parked for an
    instant; a kill right there leaves it readable (resolve) and the next writer restores it."""
    from curate.selection import readable_dir

    run = _copy_run(base_run, tmp_path / "run")
    res = curate(
        "select",
        str(run),
        "--name",
        "default",
        "--min-words",
        "6",
        CURATE_NO_RENAME_EXCHANGE="1",
        CURATE_FAILPOINT=f"publish.between_renames:{tmp_path / 'once'}",
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not (run / "selections" / "default").exists()
    summary = check_complete(Path(readable_dir(str(run), "default")))  # readers find the parked old one
    assert summary["rules"]["caption"]["min_words"] == 3
    res = curate("select", str(run), "--name", "other", "--min-words", "4", CURATE_NO_RENAME_EXCHANGE="1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert check_complete(run / "selections" / "default")["rules"]["caption"]["min_words"] == 3  # put back
    assert check_complete(run / "selections" / "other")["rules"]["caption"]["min_words"] == 4


# --- SIGINT ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_says_interrupted_and_the_manifest_says_so(base_run, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    p = _paused_run(base_run, run, 30)
    try:
        _wait_holder(run, p.pid)
        deadline = time.monotonic() + 120
        while json.loads((run / "manifest.json").read_text()).get("state") != "selecting":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        _kill_group(p)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert json.loads((run / "manifest.json").read_text())["state"] == "interrupted"
    check_complete(run / "selections" / "default")  # the previous selection is intact


# --- clear errors, before anything is written -------------------------------------------------------
def test_settings_and_paths_are_checked_before_the_first_shard(base_run, tmp_path):
    spec = tmp_path / "spec.toml"
    base = (Path(__file__).resolve().parent.parent / "pipelines" / "laion_sample.toml").read_text()
    spec.write_text(base + '\n[report]\ngroup_columns = ["no_such_column"]\n')
    out = tmp_path / "run"
    res = curate("run", str(spec), "--input", str(base_run["input"]), "--out", str(out))
    assert res.returncode == 2 and "no_such_column" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()  # refused before a single shard (it used to fail after fetching and scoring)

    # a spec path that is a folder, or not UTF-8; an --out below a file; a forget list that is a folder
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    for spec_arg, needle in ((str(tmp_path), "is a folder"), (str(bad), "not UTF-8")):
        res = curate("show-spec", spec_arg)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    (tmp_path / "afile").write_text("x")
    res = curate("run", "laion_sample", "--input", str(base_run["input"]), "--out", str(tmp_path / "afile" / "run"))
    assert res.returncode == 2 and "afile" in res.stderr and "Traceback" not in res.stderr, res.stderr
    run = _copy_run(base_run, tmp_path / "copy")
    res = curate("forget", str(run), "--uids", str(tmp_path))
    assert res.returncode == 2 and "is a folder" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = curate(
        "run", "laion_sample", "--input", str(base_run["input"]), "--out", str(tmp_path / "r2"), "--address", "x"
    )
    assert "Traceback" not in res.stderr


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    (out / "input" / "shards").mkdir(parents=True)
    (out / "input" / "shards" / "part-00000.parquet").write_bytes(b"a user's shard")
    res = curate("demo", "--out", str(out), timeout=120)
    assert res.returncode == 2 and "not made by `curate demo`" in res.stderr, res.stderr
    assert (out / "input" / "shards" / "part-00000.parquet").read_bytes() == b"a user's shard"


def test_input_shard_names_that_would_hide_outputs_are_refused(tmp_path):
    from curate.config import InputConfig
    from curate.stages.read import ShardReadError, list_shards

    inp = tmp_path / "in"
    inp.mkdir()
    pl.DataFrame({"URL": ["http://a/x.jpg"], "TEXT": ["a"]}).write_parquet(inp / ".parquet")
    with pytest.raises(ShardReadError, match="must not be empty"):
        list_shards(InputConfig(paths=[str(inp / ".parquet")]))
