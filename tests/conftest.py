"""Shared fixtures. Ray is real: one local `ray.init()` for the whole session (as the runner does
when no address is given); the runner reuses it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAION_SAMPLE = REPO.parent / "shared" / "data" / "laion-sample" / "laion_10000.parquet"

os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def laion_sample() -> Path:
    if not LAION_SAMPLE.exists():
        pytest.fail(f"the LAION sample is missing at {LAION_SAMPLE} (CI provides ../shared beside the repo)")
    return LAION_SAMPLE
