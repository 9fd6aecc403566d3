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

    # the audit commands read the bucket too
    res = CliRunner().invoke(app, ["report", "s3://curate-test/runs/r1", "--selection", "any_language"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["sweep", "s3://curate-test/runs/r1", "--selection", "default",
                                   "--from", "0", "--to", "1", "--step", "0.5"])
    # laion_sample has no CLIP scores: the sweep says so instead of printing a flat 0% curve
    assert res.exit_code != 0 and "no row of this run has a CLIP score" in res.output, res.output


def test_full_run_with_fetch_and_model_bucket_to_bucket(tmp_path, ray_session, s3_endpoint):
    """The whole pipeline (fetch from loopback servers, bundled CLIP on actors, stored embeddings,
    near-duplicate dedup) reading its input shards from s3:// and writing every output there."""
    import contextlib

    from curate.demo.data import SITES
    from curate.demo.image_server import ImageServer
    from curate.demo.run_demo import demo_spec, write_inputs

    fs = fsspec.filesystem("s3")
    fs.mkdir("curate-full")
    with contextlib.ExitStack() as stack:
        servers = {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}
        truth = write_inputs(tmp_path, 90, 2, 5, servers)
        for p in sorted((tmp_path / "input" / "shards").glob("*.parquet")):
            fs.put(str(p), f"curate-full/in/{p.name}")
        spec = demo_spec(tmp_path).with_overrides(
            **{"input.paths": ["s3://curate-full/in/"], "output.dir": "s3://curate-full/run", "output.overwrite": False}
        )
        result = run(spec)
    assert result.ok, result.failed
    assert result.selection["reconciles"] and result.selection["counts"]["rows"] == truth.height
    for shard in ("part-00000", "part-00001"):
        for folder, suffix in (("annotations", ".parquet"), ("annotations", ".done"), ("images", ".parquet"), ("embeddings", ".parquet")):
            assert fs.exists(f"curate-full/run/{folder}/{shard}{suffix}"), (folder, shard)
    with fs.open("curate-full/run/annotations/part-00000.parquet", "rb") as f:
        ann = pl.read_parquet(f)
    assert ann["clip_score"].drop_nulls().len() > 20
    m = json.loads(fs.cat("curate-full/run/manifest.json"))
    assert m["state"] == "complete" and len(m["model"]["checkpoint_sha256"]) == 64

    cli = CliRunner()
    res = cli.invoke(app, ["select", "s3://curate-full/run", "--name", "strict", "--clip-min-score", "0.9"])
    assert res.exit_code == 0, res.output
    strict = json.loads(fs.cat("curate-full/run/selections/strict/selection.json"))
    assert strict["counts"]["rows"] == truth.height and strict["counts"]["kept"] <= result.selection["counts"]["kept"]
    res = cli.invoke(app, ["report", "s3://curate-full/run", "--selection", "strict", "--from", "0.8", "--to", "0.95", "--step", "0.05"])
    assert res.exit_code == 0, res.output
    rep = json.loads(fs.cat("curate-full/run/selections/strict/report.json"))
    assert rep["sweep"] and len(rep["sweep"]["thresholds"]) == 4
    res = cli.invoke(app, ["sweep", "s3://curate-full/run", "--selection", "default", "--from", "0.8", "--to", "0.9", "--step", "0.05"])
    assert res.exit_code == 0, res.output
