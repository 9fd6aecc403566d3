"""`curate run --address`, a Ray Jobs API submission, and a driver killed with SIGKILL then run
again, all against a `ray start --head` started by this module (its own ports, temp dir and
process session; stopped by killing that session, never with `ray stop`, which would stop every
Ray on the machine, the test session's own included). The dashboard that the Jobs API needs
runs offline on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from fault_support import (
    REPO,
    SHARDS,
    RayHead,
    assert_same_outcome,
    demo_inputs,
    demo_servers,
    files_state,
    hits,
    kill_session,
    outcome,
    routes_only_in,
    session_cmdlines,
    session_pids,
    slow_down,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=2, dashboard=True)
    try:
        yield h
    finally:
        h.stop()
    assert not session_pids(h.proc.pid), "processes of the test's ray head survived"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster_jobs")
    with demo_servers() as servers:
        truth = demo_inputs(base, servers)
        yield {"base": base, "inputs": str(base / "input" / "shards"), "truth": truth, "servers": servers}


def _cmd(data, out: Path, head) -> list[str]:
    return [
        sys.executable,
        "-m",
        "curate.cli",
        "run",
        "demo",
        "--input",
        data["inputs"],
        "--out",
        str(out),
        "--address",
        head.address,
    ]


@pytest.fixture(scope="module")
def job_run(head, data):
    """`curate run demo --input ... --out ...` submitted through the Ray Jobs API: the clean run
    the other test compares with."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = data["base"] / "job-run"
    client = JobSubmissionClient(head.dashboard_url)
    t0 = time.monotonic()
    job_id = wait_until(lambda: _submit(client, f"curate run demo --input {data['inputs']} --out {out}"), 60, 0.5)
    assert job_id, "the head's job agent never came up"
    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    status = wait_until(lambda: (st := client.get_job_status(job_id)) in final and st, 300, 0.5)
    print(f"job {job_id}: {status} after {time.monotonic() - t0:.1f}s")
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{client.get_job_status(job_id)}: {logs[-4000:]}"
    return {"out": out, "logs": logs, "client": client}


def _submit(client, entrypoint: str) -> str | None:
    """The dashboard answers before the head's job agent has registered: retry until it has."""
    try:
        return client.submit_job(entrypoint=entrypoint)
    except RuntimeError as e:
        if "No available agent" in str(e):
            return None
        raise


def test_job_submission_runs_curate_on_the_cluster(data, job_run):
    out = job_run["out"]
    assert "counts reconcile: yes" in job_run["logs"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["state"] == "complete" and m["counts"]["shards_complete"] == SHARDS
    # the job's driver joined the cluster through RAY_ADDRESS, which Ray sets for job drivers
    assert m["cluster"]["address"] and m["cluster"]["nodes"] == 1
    got = outcome(out)
    assert got.height == data["truth"].height and got.select("shard", "row").n_unique() == got.height
    kept = got.filter("kept")
    assert 0 < kept.height < got.height and kept["uid"].n_unique() == kept.height
    assert got.filter(pl.col("reason").is_null() | (pl.col("reason") == "clip_score"))["clip_score"].null_count() == 0


def test_run_with_address_killed_then_rerun_redoes_only_unfinished_shards(head, data, job_run, tmp_path):
    """`curate run --address <head>`, SIGKILLed once 3 shards are done, then the same command
    again: only unfinished shards are redone and the result equals the clean run."""
    from ray.job_submission import JobType

    servers, truth = data["servers"], data["truth"]
    out = tmp_path / "run"
    cmd = _cmd(data, out, head)
    slow_down(servers, truth, lambda k: 0.5 * k)  # shards finish in order, the last ones seconds later
    driver = subprocess.Popen(
        cmd, env=head.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        ok = wait_until(
            lambda: len(list((out / "annotations").glob("*.done"))) >= 3 or driver.poll() is not None, 240, 0.02
        )
        assert ok and driver.poll() is None, driver.stdout.read().decode(errors="replace")[-3000:]
        scorer_running = any(c.startswith("ray::ShardScorer") for c in session_cmdlines(head.proc.pid))
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as a user or the OOM killer would
        driver.wait(timeout=10)
        done = sorted(p.stem for p in (out / "annotations").glob("*.done"))
        assert 3 <= len(done) < SHARDS, done
        assert not session_cmdlines(driver.pid), "the killed driver left processes behind"
        # on the cluster, Ray ends the dead driver's job: its scoring actor goes too
        assert scorer_running
        gone = wait_until(
            lambda: not any(c.startswith("ray::ShardScorer") for c in session_cmdlines(head.proc.pid)), 60
        )
        assert gone, session_cmdlines(head.proc.pid)
    finally:
        kill_session(driver.pid)
        slow_down(servers, truth, lambda k: 0.0)
    assert json.loads((out / "manifest.json").read_text())["state"] == "running"

    before = files_state(out, done)
    urls = routes_only_in(truth, done)  # images only finished shards hold: never fetched again
    hits_before = hits(servers, urls)
    assert sum(v > 0 for v in hits_before.values()) > 10  # (rows the text rules drop are never fetched)
    t0 = time.monotonic()
    rerun = subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    print(f"rerun after SIGKILL: {time.monotonic() - t0:.1f}s")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert files_state(out, done) == before, "a finished shard was redone"
    assert hits(servers, urls) == hits_before, "a finished shard's images were fetched again"
    m = json.loads((out / "manifest.json").read_text())
    assert m["state"] == "complete" and m["counts"]["shards_complete"] == SHARDS
    assert_same_outcome(out, job_run["out"], truth)

    # --address joined the head's cluster: both drivers, killed and rerun, are jobs there
    drivers = [
        j for j in job_run["client"].list_jobs() if j.type == JobType.DRIVER and str(out) in (j.entrypoint or "")
    ]
    assert len(drivers) == 2, drivers
    assert m["cluster"]["address"] == head.address and m["cluster"]["nodes"] == 1
