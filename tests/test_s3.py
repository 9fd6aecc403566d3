"""Buckets through the same code as local files: a run from s3:// to s3:// on a real S3 API
(moto's server on 127.0.0.1), then a model-free re-selection reading from the bucket."""

import json

import fsspec
import polars as pl
from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_spec
from curate.presets import preset_path
from curate.runner import run


def test_run_and_select_from_bucket_to_bucket(laion_sample, ray_session, s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.mkdir("curate-test")
    src = pl.read_parquet(laion_sample).head(400)
    for k in range(2):
        with fs.open(f"curate-test/in/part-{k}.parquet", "wb") as f:
            src.slice(200 * k, 200).write_parquet(f)

    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{"input.paths": ["s3://curate-test/in/"], "output.dir": "s3://curate-test/runs/r1"}
    )
    result = run(spec)
    assert result.ok, result.failed
    assert result.selection["counts"]["rows"] == 400 and result.selection["reconciles"]
    assert fs.exists("curate-test/runs/r1/annotations/part-0.done")
    m = json.loads(fs.cat("curate-test/runs/r1/manifest.json"))
    assert [i["path"] for i in m["inputs"]] == ["s3://curate-test/in/part-0.parquet", "s3://curate-test/in/part-1.parquet"]
    assert all(i["bytes"] > 0 for i in m["inputs"])
    etags = {i["path"]: i["version"] for i in m["inputs"]}
    assert etags["s3://curate-test/in/part-0.parquet"] == fs.info("curate-test/in/part-0.parquet")["ETag"].strip('"')

    res = CliRunner().invoke(app, ["select", "s3://curate-test/runs/r1", "--name", "any_language", "--languages", ""])
    assert res.exit_code == 0, res.output
    sel = json.loads(fs.cat("curate-test/runs/r1/selections/any_language/selection.json"))
    assert sel["counts"]["rows"] == 400
    assert sel["counts"]["kept"] > result.selection["counts"]["kept"]
    with fs.open("curate-test/runs/r1/selections/any_language/kept/part-1.parquet", "rb") as f:
        assert pl.read_parquet(f).height > 0
    assert fs.exists("curate-test/runs/r1/selections/any_language/report.html")
