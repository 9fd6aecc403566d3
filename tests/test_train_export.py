"""A real trainer reads what `curate export` writes: open_clip's own training script
(`python -m open_clip_train.main`, shipped in the open_clip_torch wheel) trains the bundled
curate-tiny CLIP on CPU from the exported webdataset tars, the command docs/EXPORT.md gives."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from curate.demo.run_demo import demo_spec, write_inputs
from curate.executor import LocalExecutor
from curate.export import export
from curate.model import BUNDLED_CHECKPOINT, BUNDLED_MODEL
from curate.runner import run
from fault_support import demo_servers

BATCH = 8


def open_clip_model_dir(where: Path) -> Path:
    """The bundled model as an open_clip `local-dir:` model: its config and its checkpoint."""
    where.mkdir()
    cfg = json.loads((BUNDLED_CHECKPOINT.parent / f"{BUNDLED_MODEL}.json").read_text())
    (where / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (where / "open_clip_model.safetensors").symlink_to(BUNDLED_CHECKPOINT)
    return where


@pytest.mark.slow
def test_open_clip_train_trains_the_bundled_model_from_an_export(tmp_path):
    with demo_servers() as servers:
        write_inputs(tmp_path, 48, 2, 3, servers)
        result = run(demo_spec(tmp_path), executor=LocalExecutor())
    assert result.ok, result.failed
    shards = tmp_path / "shards"
    summary = export(
        str(tmp_path / "run"), str(shards), "webdataset", selection="default", shard_size=8, executor=LocalExecutor()
    )
    samples = summary["counts"]["exported"]
    assert summary["reconciles"] and samples >= 2 * BATCH and summary["shards"] >= 2

    logs = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", f"local-dir:{open_clip_model_dir(tmp_path / 'model')}",
        "--dataset-type", "webdataset",
        "--train-data", f"{shards}/{{00000..{summary['shards'] - 1:05d}}}.tar",
        "--train-num-samples", str(samples),
        "--batch-size", str(BATCH),
        "--epochs", "1",
        "--workers", "0",
        "--device", "cpu",
        "--precision", "fp32",
        "--lr", "1e-4",
        "--warmup", "1",
        "--seed", "0",
        "--log-every-n-steps", "1",
        "--save-frequency", "0",
        "--report-to", "",
        "--logs", str(logs),
        "--name", "export",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    log = (logs / "export" / "out.log").read_text()
    assert "Loading full pretrained weights from" in log, log[-3000:]  # it trains the bundled checkpoint
    steps = re.findall(r"Train Epoch: 0 \[.*? Loss: (\S+) ", log)
    assert len(steps) >= 2, log[-3000:]
    assert all(math.isfinite(float(loss)) for loss in steps), steps
