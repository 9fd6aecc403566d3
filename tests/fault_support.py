"""Helpers for the fault-tolerance and cluster tests (tests/test_faults.py,
tests/test_cluster_jobs.py): small demo inputs served from loopback image servers, an outcome
check against a clean run, process-session cleanup, and a private `ray start` head.

Ray instances started here never touch the machine's default Ray temp dir (/tmp/ray), whose
`ray_current_cluster` file a plain `ray.init()` elsewhere would join: each gets RAY_TMPDIR
and --temp-dir of its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import polars as pl

from curate.demo.data import SITES
from curate.demo.image_server import ImageServer
from curate.demo.run_demo import write_inputs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ROWS, SHARDS, SEED = 160, 8, 11


@contextlib.contextmanager
def demo_servers():
    with contextlib.ExitStack() as stack:
        yield {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}


def demo_inputs(out: Path, servers: dict[str, ImageServer], rows: int = ROWS, shards: int = SHARDS) -> pl.DataFrame:
    """8 shards of 20 rows (part-00000 .. part-00007) and their ground truth."""
    return write_inputs(out, rows, shards, SEED, servers)


def slow_down(servers: dict[str, ImageServer], truth: pl.DataFrame, delay_for_shard) -> None:
    """Re-register the images of each shard with delay_for_shard(k) seconds before the answer, so
    that shards finish in order and a fault can land while later ones are still in flight."""
    for shard, url in truth.select("shard", "URL").iter_rows():
        k = int(shard.rsplit("-", 1)[1])
        host, path = url_route(url)
        srv = servers[host]
        route = srv._routes.get(path)
        if route is not None:
            srv.add(path, route.body, route.content_type, route.status, dict(route.headers), delay_s=delay_for_shard(k))


def url_route(url: str) -> tuple[str, str]:
    """(host, the path the ImageServer keys its routes and hits by)."""
    u = urlsplit(url)
    return u.hostname, u.path + (f"?{u.query}" if u.query else "")


def spec_overrides(inp: Path, out: Path) -> dict:
    return {"input.paths": [str(inp / "input" / "shards")], "output.dir": str(out), "output.overwrite": False}


def outcome(run_dir: Path) -> pl.DataFrame:
    """Every decided row of the default selection: shard, row, uid, kept, reason, clip_score."""
    sel = Path(run_dir) / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(
        pl.lit(True).alias("kept"), pl.lit(None, pl.String).alias("reason")
    )
    removed = pl.read_parquet(sel / "removed" / "*.parquet").with_columns(pl.lit(False).alias("kept"))
    cols = ["shard", "row", "uid", "kept", "reason", "clip_score"]
    return pl.concat([kept.select(cols), removed.select(cols)]).sort("shard", "row")


def annotations_frame(run_dir: Path) -> pl.DataFrame:
    """The annotation rows that a rerun must reproduce exactly (statuses, sizes, hashes, scores)."""
    cols = ["shard", "row", "uid", "fetch_status", "width", "height", "image_sha256", "clip_score", "clip_model"]
    return pl.read_parquet(Path(run_dir) / "annotations" / "*.parquet").select(cols).sort("shard", "row")


def assert_same_outcome(run_dir: Path, reference: Path, truth: pl.DataFrame) -> None:
    """kept + removed = input (each input row decided exactly once), no duplicate uid among kept
    rows or in uids.npy, and the same rows, decisions and scores as the clean reference run."""
    got, ref = outcome(run_dir), outcome(reference)
    assert got.height == truth.height, (got.height, truth.height)
    assert got.select("shard", "row").n_unique() == truth.height
    assert sorted(got.select("shard", "row").rows()) == sorted(truth.select("shard", "row").rows())
    kept = got.filter("kept")
    assert kept["uid"].n_unique() == kept.height, "duplicate uid among kept rows"
    uids = np.load(Path(run_dir) / "selections" / "default" / "uids.npy")
    assert len(uids) == kept.height and len(np.unique(uids)) == len(uids)
    assert set(kept["uid"]) == set(outcome(reference).filter("kept")["uid"]), "kept uid set differs from the clean run"
    assert got.equals(ref), "decisions or scores differ from the clean run"
    assert annotations_frame(run_dir).equals(annotations_frame(reference))
    summary = json.loads((Path(run_dir) / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] and summary["counts"]["rows"] == truth.height
    assert summary["counts"]["kept"] + summary["counts"]["removed"] == truth.height


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmp(prefix: str) -> str:
    """Ray's unix sockets live under its temp dir: keep the path short (AF_UNIX limit)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def session_pids(sid: int) -> list[int]:
    """Processes in the session `sid` (a child started with start_new_session has sid == its pid)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(d.name))
    return pids


def kill_session(sid: int, timeout: float = 20.0) -> list[int]:
    """SIGKILL every process of session `sid`, process group by group, until none is left;
    returns the pids that were still there at the first look."""
    first = session_pids(sid)
    deadline = time.monotonic() + timeout
    while True:
        pids = session_pids(sid)
        if not pids:
            return first
        for pgid in {os.getpgid(p) for p in pids if _exists(p)}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {sid} survive SIGKILL: {pids}")
        time.sleep(0.1)


def _exists(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


def run_in_session(
    cmd: list[str], env: dict[str, str], timeout: float, cwd: str | Path | None = None, merge_stderr: bool = False
) -> subprocess.CompletedProcess:
    """Run `cmd` to its end in a process session of its own; whatever it started (Ray's processes
    too) is killed afterwards, also when it overruns `timeout` (then TimeoutExpired). With
    merge_stderr, stderr goes into stdout."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def driver_result(
    code: str, *args: str, drop_env: tuple[str, ...] = (), timeout: float = 240, **env_extra: str
) -> dict:
    """Run a Python driver script in a process session of its own (everything it starts is
    killed afterwards) and return the JSON it printed after "RESULT ". The driver gets a local
    Ray of its own: RAY_ADDRESS and CURATE_FAILPOINT (and `drop_env`) are not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CURATE_FAILPOINT", *drop_env)}
    env.update({"RAY_AUTH_MODE": "disabled", "CURATE_PROGRESS": "0", **env_extra})
    res = run_in_session([sys.executable, "-c", code, *args], env, timeout, cwd=REPO)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"driver exited {res.returncode} without a result:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def child_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    """Environment for a child that runs Ray: private temp dir, no inherited cluster address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CURATE_FAILPOINT")}
    env.update(
        {
            "RAY_TMPDIR": ray_tmp,
            "CURATE_PROGRESS": "0",
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class RayHead:
    """`ray start --head --block` for one test module: its own ports, temp dir and session;
    stopped by killing that session only (never `ray stop`, which stops every Ray on the machine)."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = True):
        self.tmp = short_tmp("crh")
        self.port, self.dash_port = free_port(), free_port()
        self.env = child_env(self.tmp)
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--temp-dir",
            os.path.join(self.tmp, "ray"),
            "--disable-usage-stats",
            "--object-store-memory",
            str(200 * 1024 * 1024),
            # ports that default to fixed numbers (52365, 10001): free ones, so that two heads
            # (or a head beside another Ray) on one machine do not collide
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
        ]
        if dashboard:
            cmd += [
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dash_port),
            ]
        else:
            cmd += ["--include-dashboard", "false"]
        self.log = open(os.path.join(self.tmp, "ray-start.log"), "wb")
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp
        )
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dash_port}"
        try:
            self._wait(dashboard)
        except BaseException:
            self.stop()
            raise

    def _wait(self, dashboard: bool, timeout: float = 90.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                if dashboard:
                    with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                        if r.status == 200:
                            return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up in {timeout}s: {self.log_text()[-3000:]}")
            time.sleep(0.5)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.tmp, "ray-start.log").read_text(errors="replace")

    def stop(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def session_cmdlines(sid: int, ignore: tuple[str, ...] = ()) -> list[str]:
    """Command lines of the live processes in session `sid`, leaving out those starting with `ignore`."""
    return [c for c in (_cmdline(p) for p in session_pids(sid)) if c and not c.startswith(ignore)]


def wait_until(predicate, timeout: float, step: float = 0.2):
    """predicate() until it is truthy or `timeout` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def files_state(run_dir: Path, shards: list[str]) -> dict:
    """(inode, mtime, bytes) of each shard's annotation file and completion marker."""
    out = {}
    for s in shards:
        for p in (Path(run_dir) / "annotations" / f"{s}.done", Path(run_dir) / "annotations" / f"{s}.parquet"):
            st = p.stat()
            out[p.name] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out


def routes_only_in(truth: pl.DataFrame, shards: list[str]) -> list[str]:
    """URLs whose server route (host, path and query: what the server counts) no other shard
    requests: URLs differing only in a fragment are one route."""
    r = truth.with_columns(
        pl.col("URL").map_elements(lambda u: "".join(url_route(u)), return_dtype=pl.String).alias("_route")
    )
    inside = r.filter(pl.col("shard").is_in(shards))
    outside = set(r.filter(~pl.col("shard").is_in(shards))["_route"])
    return sorted(u for u, route in inside.select("URL", "_route").iter_rows() if route not in outside)


def hits(servers: dict[str, ImageServer], urls: list[str]) -> dict[str, int]:
    out = {}
    for url in urls:
        host, path = url_route(url)
        out[url] = servers[host].hits[path]
    return out
