"""The manifest as an audit trail: code version, packages, preprocessing, opt-out policy, inputs
with sizes and versions, output files with checksums; and "same manifest + same inputs => the same
kept uid set": two runs of one spec on one input agree byte for byte on what they keep."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curate import io as curate_io, manifest
from curate.cli import app


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, laion_sample, ray_session):
    tmp = tmp_path_factory.mktemp("audit")
    src = pl.read_parquet(laion_sample).head(400)
    inp = tmp / "in"
    inp.mkdir()
    src.head(200).write_parquet(inp / "part-0.parquet")
    src.tail(200).write_parquet(inp / "part-1.parquet")
    runs = []
    for name in ("a", "b"):
        res = CliRunner().invoke(app, ["run", "laion_sample", "--input", str(inp), "--out", str(tmp / name)])
        assert res.exit_code == 0, res.output
        runs.append(tmp / name)
    return runs


def test_same_spec_same_inputs_same_kept_set_and_checksums(two_runs):
    a, b = two_runs
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert ma["config_hash"] != "" and ma["spec"]["input"] == mb["spec"]["input"]
    # the kept uid set, and the files that carry it, are identical
    ua, ub = (np.load(r / "selections" / "default" / "uids.npy") for r in (a, b))
    assert len(ua) > 100 and ua.tolist() == ub.tolist()
    assert _sha(a / "selections" / "default" / "uids.npy") == _sha(b / "selections" / "default" / "uids.npy")
    fa, fb = ma["outputs"]["files"], mb["outputs"]["files"]
    kept = sorted(k for k in fa if k.startswith("selections/default/kept/"))
    assert kept == ["selections/default/kept/part-0.parquet", "selections/default/kept/part-1.parquet"]
    # parquet files carry no timestamps: the bytes, not only the content, are reproducible
    for rel in [
        *kept,
        *(k for k in fa if k.startswith("selections/default/removed/")),
        "annotations/part-0.parquet",
        "annotations/part-1.parquet",
        "selections/default/uids.npy",
    ]:
        assert fa[rel]["sha256"] == fb[rel]["sha256"], rel
        assert fa[rel]["sha256"] == _sha(a / rel)


def test_manifest_records_the_audit_trail(two_runs):
    run = two_runs[0]
    m = json.loads((run / "manifest.json").read_text())
    code = m["code"]
    assert code["curate"] == m["packages"]["curate"]
    # this test runs from the checkout: the commit and a dirty flag are recorded
    head = subprocess.run(["git", "-C", code["source_dir"], "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert code["git_commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    assert m["packages"]["polars"] and m["packages"]["pyarrow"]
    assert m["language_model"] and "lid.176" in m["language_model"]
    # no fetch in this preset: no fetch preprocessing, no X-Robots-Tag policy applied
    assert m["preprocessing"] == {"fetch": None}
    assert m["opt_out"] == {"x_robots_tag": None, "lists": []}
    assert m["deletion_lists"] == [] and m["forget_requests"] == []
    assert [Path(i["path"]).name for i in m["inputs"]] == ["part-0.parquet", "part-1.parquet"]
    assert all(i["bytes"] > 0 and i["version"] for i in m["inputs"])
    files = m["outputs"]["files"]
    for rel in (
        "annotations/part-0.parquet",
        "annotations/part-0.done",
        "selections/default/selection.json",
        "selections/default/report.json",
        "selections/default/report.html",
        "selections/default/uids.npy",
    ):
        assert rel in files and files[rel]["bytes"] == (run / rel).stat().st_size
        assert re.fullmatch(r"[0-9a-f]{64}", files[rel]["sha256"])
    assert any(k.startswith("selections/default/tables/") for k in files)
    assert m["selections"] == ["default"] and m["selection_specs"]["default"]["name"] == "default"


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_checksums_follow_a_new_selection_and_reuse_unchanged_files(two_runs, monkeypatch, engine):
    run = two_runs[1]
    name = f"loose-{engine}"
    before = json.loads((run / "manifest.json").read_text())["outputs"]["files"]
    hashed: list[str] = []
    real = curate_io.sha256_file
    monkeypatch.setattr(curate_io, "sha256_file", lambda url, *a, **k: hashed.append(url) or real(url, *a, **k))
    res = CliRunner().invoke(app, ["select", str(run), "--name", name, "--min-words", "1", "--engine", engine])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "manifest.json").read_text())
    files = m["outputs"]["files"]
    assert f"selections/{name}/kept/part-0.parquet" in files
    # every file of the selection is recorded with its true checksum and size
    mine = [k for k in files if k.startswith(f"selections/{name}/")]
    assert {k.split("/")[2] for k in mine} >= {"kept", "removed", "uids.npy", "tables", "report.json"}
    for rel in mine:
        assert files[rel]["sha256"] == _sha(run / rel) and files[rel]["bytes"] == (run / rel).stat().st_size, rel
    # the annotations did not change: their checksums were reused, not recomputed
    assert files["annotations/part-0.parquet"] == before["annotations/part-0.parquet"]
    assert not any("annotations" in h for h in hashed)
    # the data files were hashed as they were written (by the tasks, on Ray), never read back to
    # be hashed; only the few small files the driver writes last (report, selection.json) are
    data = [h for h in hashed if any(f"/{d}/" in h for d in ("kept", "removed", "tables")) or h.endswith("uids.npy")]
    assert data == [] and any(name in h for h in hashed)
    assert m["selection_specs"][name]["caption"]["min_words"] == 1


def test_code_version_outside_a_checkout_is_none(tmp_path):
    v = manifest.code_version(str(tmp_path))
    assert v["git_commit"] is None and v["dirty"] is None and v["curate"]


def test_model_transform_is_described():
    from curate.model import load_clip

    clip = load_clip("curate-tiny", "bundled", device="cpu")
    d = manifest.describe_transform(clip.preprocess, clip.model.visual)
    assert any(s.startswith("Resize(") for s in d["steps"]) and any(s.startswith("Normalize(") for s in d["steps"])
    # open_clip records a ViT's size as [h, w] and a ResNet's as one int: 64 px square either way
    assert d["config"]["size"] in (64, [64, 64]) and d["config"]["resize_mode"] == "shortest"
    json.dumps(d)  # plain JSON for the manifest
