"""A corrupt shard among good ones: a clear error naming it, the other shards complete, the run
exits non-zero, and the manifest and report list the failed shard."""

import json

import polars as pl
from typer.testing import CliRunner

from curate.cli import app


def test_corrupt_shard_fails_loudly_and_alone(tmp_path, laion_sample, ray_session):
    src = pl.read_parquet(laion_sample).head(300)
    inp = tmp_path / "in"
    inp.mkdir()
    src.head(150).write_parquet(inp / "part-0.parquet")
    src.tail(150).write_parquet(inp / "part-1.parquet")
    (inp / "part-2.parquet").write_bytes(b"PAR1" + b"not really parquet" * 50)
    out = tmp_path / "run"

    res = CliRunner().invoke(app, ["run", "laion_sample", "--input", str(inp), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "part-2" in res.output and "not a readable parquet file" in res.output

    m = json.loads((out / "manifest.json").read_text())
    assert m["state"] == "failed"
    assert list(m["failed_shards"]) == ["part-2"] and "part-2.parquet" in m["failed_shards"]["part-2"]
    assert m["counts"]["shards_complete"] == 2 and m["counts"]["rows"] == 300

    sel = out / "selections" / "default"
    summary = json.loads((sel / "selection.json").read_text())
    assert summary["counts"]["rows"] == 300 and summary["reconciles"]
    report = json.loads((sel / "report.json").read_text())
    assert "part-2" in report["meta"]["failed_shards"]
    assert "part-2" in (sel / "report.html").read_text()
