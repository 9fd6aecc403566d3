"""Ray start-up (curate/ray_adapter.py connect()): `ray.init_timeout_s` sets Ray's own start-up
waits; a local start that fails is cleaned up and retried once, then is a RuntimeError that says
what to do; a cluster address that refuses is an error at once, not retried.

Each case runs connect() in a driver subprocess of its own (its own process session, killed in a
finally): the failures are real Ray start-up timeouts (Ray's GCS port wait at 0 s, through the
same knob `init_timeout_s` sets), and the test session may already hold a Ray of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from pydantic import ValidationError

from curate.config import RayConfig
from fault_support import REPO, driver_result, kill_session

DRIVER = r"""
import json, logging, os, sys, time
args = json.loads(sys.argv[1])
warnings = []

class Keep(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING and record.name.startswith("curate"):
            warnings.append(record.getMessage())

logging.getLogger("curate").addHandler(Keep())
from curate import ray_adapter as rx
from curate.config import RayConfig

def ray_children():
    return sorted(" ".join(p.cmdline())[:300] for p in rx._ray_children().values())

out = {}
t0 = time.monotonic()
try:
    info = rx.connect(RayConfig(**args["cfg"]))
    out["info"] = info.as_dict()
    import ray
    out["session_dir"] = ray._private.worker.global_worker.node.get_session_dir_path()
    out["task"] = rx.get(rx.cpu_task(lambda x: x * 2).remote(21))
    # where task results of each size live: in the driver's memory (no node) or a node's object store
    refs = [rx.cpu_task(lambda n: b"x" * n).remote(n) for n in (100, 5_000, 50_000)]
    rx.get(refs)
    out["in_object_store"] = [bool(v["node_ids"]) for v in ray.experimental.get_object_locations(refs).values()]
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds"] = time.monotonic() - t0
out["warnings"] = warnings
out["ray_children"] = ray_children()
rx.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""


def _drive(cfg: dict, env_extra: dict | None = None, timeout: float = 240) -> dict:
    return driver_result(DRIVER, json.dumps({"cfg": cfg}), timeout=timeout, **(env_extra or {}))


def _gcs_servers(children: list[str]) -> list[str]:
    return [c for c in children if "/gcs/gcs_server" in c]


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 3601])
def test_init_timeout_must_be_positive_and_finite(bad):
    with pytest.raises(ValidationError) as e:
        RayConfig(init_timeout_s=bad)
    assert "init_timeout_s" in str(e.value)


def test_init_timeout_default_and_values():
    assert RayConfig().init_timeout_s == 60
    assert RayConfig(init_timeout_s=0.5).init_timeout_s == 0.5
    assert RayConfig(init_timeout_s=600).init_timeout_s == 600


def test_first_start_times_out_then_the_retry_starts_ray(tmp_path):
    """The failpoint gives the first attempt Ray's GCS port wait at 0 s: Ray's own start-up times
    out (its GCS is running by then). The warning says so; the GCS of that attempt is gone (only
    one GCS, the new session's, is left); the retried Ray runs tasks."""
    once = tmp_path / "once"
    res = _drive({"num_cpus": 1}, {"CURATE_FAILPOINT": f"ray_start_timeout:{once}"})
    assert "error" not in res, res
    assert json.loads(once.read_text())["failpoint"] == "ray_start_timeout"
    assert len(res["warnings"]) == 1, res["warnings"]
    warning = res["warnings"][0]
    assert warning.startswith("Ray did not start in ") and warning.endswith("retrying once"), warning
    assert "Timed out waiting for file" in warning  # Ray's own timeout, not an exception of ours
    assert "ray.init_timeout_s = 60" in warning
    gcs = _gcs_servers(res["ray_children"])
    assert len(gcs) == 1, res["ray_children"]  # the failed attempt's GCS was killed
    assert res["session_dir"] in gcs[0]
    assert res["task"] == 42
    assert res["info"]["cpus"] == 1.0
    # ray.inline_return_bytes (1 KiB): only the 100-byte result is held in the driver's memory
    assert res["in_object_store"] == [False, True, True]


def test_both_starts_fail_with_an_error_that_says_what_to_do_and_nothing_left():
    """init_timeout_s under 1 s: Ray's waits are 0 s in both attempts, both time out for real."""
    res = _drive({"num_cpus": 1, "init_timeout_s": 0.5})
    err = res.get("error", "")
    assert err.startswith("RuntimeError: a local Ray did not start, twice"), res
    assert err.count("Timed out waiting for file") == 2, err
    assert "ray.init_timeout_s" in err and "ray start --head" in err and "--address" in err
    assert len(res["warnings"]) == 1 and "retrying once" in res["warnings"][0]
    assert res["ray_children"] == []  # both attempts' GCS processes killed, not left to the exit


def test_a_cluster_address_that_refuses_is_an_error_at_once():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _drive({"address": f"127.0.0.1:{port}"}, timeout=120)
    err = res.get("error", "")
    assert err.startswith("RuntimeError: cannot reach the Ray cluster at"), res
    assert f"127.0.0.1:{port}" in err and "ray start --head" in err
    assert res["warnings"] == []  # not retried
    assert res["seconds"] < 15, res["seconds"]  # Ray alone keeps trying for minutes
    assert res["ray_children"] == []


KILLED_DRIVER = r"""
import sys, time
from curate import ray_adapter as rx
from curate.config import RayConfig
rx.connect(RayConfig(num_cpus=1))
print("up", flush=True)
time.sleep(600)
"""


def test_a_killed_drivers_local_ray_is_gone_within_seconds():
    """SIGKILL the driver alone: every Ray process its start made (GCS, raylet, and the dashboard
    and runtime-env agents, which Ray itself leaves for a minute or more) is gone within 20 s."""
    import time

    from fault_support import session_cmdlines, session_pids, wait_until

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert driver.stdout.readline().strip() == "up"
        started = [p for p in session_pids(driver.pid) if p != driver.pid]
        agents = [c for c in session_cmdlines(driver.pid) if "Agent" in c]
        assert started and agents, (started, agents)  # the processes this is about
        driver.kill()
        driver.wait()
        t0 = time.monotonic()
        left = wait_until(lambda: not session_pids(driver.pid), timeout=20)
        assert left, (
            f"still running {time.monotonic() - t0:.0f} s after the driver died: {session_cmdlines(driver.pid)}"
        )
    finally:
        kill_session(driver.pid)


def test_task_results_above_inline_return_bytes_stay_in_the_object_store():
    """Ray's own threshold (100 KiB) when asked for: every result here is held by the driver; the
    setting reaches the workers of the job (they read it when they start)."""
    res = _drive({"num_cpus": 1, "inline_return_bytes": 100 * 1024})
    assert "error" not in res, res
    assert res["in_object_store"] == [False, False, False]
    res = _drive({"num_cpus": 1, "inline_return_bytes": 0})
    assert res["in_object_store"] == [True, True, True]


@pytest.mark.parametrize("bad", [-1, 100 * 1024 + 1])
def test_inline_return_bytes_is_bounded(bad):
    with pytest.raises(ValidationError, match="inline_return_bytes"):
        RayConfig(inline_return_bytes=bad)
