"""Shared fixtures. Ray is real: one local `ray.init()` for the whole session (as the runner does
when no address is given); the runner reuses it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAION_SAMPLE = REPO / "data" / "laion-sample" / "laion_10000.parquet"  # shipped in the repository

os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: moto's server on 127.0.0.1, configured the way a user points s3fs/polars at
    MinIO or another endpoint (AWS_ENDPOINT_URL and the standard credential variables). Started
    before Ray so that Ray's workers inherit the same environment."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def laion_sample() -> Path:
    if not LAION_SAMPLE.exists():
        pytest.fail(f"the LAION sample is missing at {LAION_SAMPLE} (it is committed under data/laion-sample/)")
    return LAION_SAMPLE


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo (`curate demo`'s data: 360 rows in 3 shards, seed 7, served from loopback servers that
    stay up for the session) run once with the demo spec on the in-process executor: fetched images,
    the bundled CLIP's scores and stored image embeddings, and the ground truth of each row (what its
    image shows: image_shape, image_color). Tests may add selections; one that changes the run works
    on a copy."""
    from fault_support import demo_servers

    from curate.demo.run_demo import demo_spec, write_inputs
    from curate.executor import LocalExecutor
    from curate.runner import run

    out = tmp_path_factory.mktemp("demo-run")
    with demo_servers() as servers:
        truth = write_inputs(out, 360, 3, 7, servers)
        spec = demo_spec(out)
        res = run(spec, executor=LocalExecutor())
        assert res.ok, res.failed
        yield {"run": Path(res.run_dir), "truth": truth, "spec": spec, "servers": servers}
