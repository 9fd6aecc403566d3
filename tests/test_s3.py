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
from curate.selection import readable_dir


def _sel(run_dir: str, name: str) -> str:
    """The bucket path of a selection's published version (CURRENT.json names it)."""
    return readable_dir(run_dir, name).removeprefix("s3://")


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
    assert [i["path"] for i in m["inputs"]] == [
        "s3://curate-test/in/part-0.parquet",
        "s3://curate-test/in/part-1.parquet",
    ]
    assert all(i["bytes"] > 0 for i in m["inputs"])
    etags = {i["path"]: i["version"] for i in m["inputs"]}
    assert etags["s3://curate-test/in/part-0.parquet"] == fs.info("curate-test/in/part-0.parquet")["ETag"].strip('"')

    res = CliRunner().invoke(app, ["select", "s3://curate-test/runs/r1", "--name", "any_language", "--languages", ""])
    assert res.exit_code == 0, res.output
    sel_dir = _sel("s3://curate-test/runs/r1", "any_language")
    assert "/selections/any_language/v-" in sel_dir  # a published version, not the folder itself
    sel = json.loads(fs.cat(f"{sel_dir}/selection.json"))
    assert sel["counts"]["rows"] == 400
    assert sel["counts"]["kept"] > result.selection["counts"]["kept"]
    with fs.open(f"{sel_dir}/kept/part-1.parquet", "rb") as f:
        assert pl.read_parquet(f).height > 0
    assert fs.exists(f"{sel_dir}/report.html")

    # the audit commands read the bucket too
    res = CliRunner().invoke(app, ["report", "s3://curate-test/runs/r1", "--selection", "any_language"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app,
        ["sweep", "s3://curate-test/runs/r1", "--selection", "default", "--from", "0", "--to", "1", "--step", "0.5"],
    )
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
        for folder, suffix in (
            ("annotations", ".parquet"),
            ("annotations", ".done"),
            ("images", ".parquet"),
            ("embeddings", ".parquet"),
        ):
            assert fs.exists(f"curate-full/run/{folder}/{shard}{suffix}"), (folder, shard)
    with fs.open("curate-full/run/annotations/part-00000.parquet", "rb") as f:
        ann = pl.read_parquet(f)
    assert ann["clip_score"].drop_nulls().len() > 20
    m = json.loads(fs.cat("curate-full/run/manifest.json"))
    assert m["state"] == "complete" and len(m["model"]["checkpoint_sha256"]) == 64

    cli = CliRunner()
    res = cli.invoke(app, ["select", "s3://curate-full/run", "--name", "strict", "--clip-min-score", "0.9"])
    assert res.exit_code == 0, res.output
    strict = json.loads(fs.cat(f"{_sel('s3://curate-full/run', 'strict')}/selection.json"))
    assert strict["counts"]["rows"] == truth.height and strict["counts"]["kept"] <= result.selection["counts"]["kept"]
    res = cli.invoke(
        app,
        ["report", "s3://curate-full/run", "--selection", "strict", "--from", "0.8", "--to", "0.95", "--step", "0.05"],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(fs.cat(f"{_sel('s3://curate-full/run', 'strict')}/report.json"))
    assert rep["sweep"] and len(rep["sweep"]["thresholds"]) == 4
    res = cli.invoke(
        app,
        ["sweep", "s3://curate-full/run", "--selection", "default", "--from", "0.8", "--to", "0.9", "--step", "0.05"],
    )
    assert res.exit_code == 0, res.output

    # selection.engine = "ray" from the bucket to the bucket: a top fraction ranked shard by shard
    # on Ray workers reading the annotation shards there, near-duplicate steps as tasks; the
    # same selection as the local engine
    got = {}
    for engine in ("local", "ray"):
        res = cli.invoke(
            app,
            ["select", "s3://curate-full/run", "--name", f"top_{engine}", "--engine", engine,
             "--clip-top-fraction", "0.4"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        d = _sel("s3://curate-full/run", f"top_{engine}")
        summary = json.loads(fs.cat(f"{d}/selection.json"))
        with fs.open(f"{d}/removed/part-00000.parquet", "rb") as f:
            removed = pl.read_parquet(f).select("uid", "reason", "reasons", "duplicate_of", "duplicate_cluster")
        got[engine] = (summary["resolved"], summary["counts"], fs.cat(f"{d}/uids.npy"), removed.sort("uid"))
        assert summary["rules"]["engine"] == engine
    (res_l, counts_l, uids_l, rem_l), (res_r, counts_r, uids_r, rem_r) = got["local"], got["ray"]
    assert res_l == res_r and res_l["clip_rule"] == "top_fraction"
    assert counts_l == counts_r and uids_l == uids_r and rem_l.equals(rem_r)


def test_bucket_selections_publish_whole_and_one_writer_holds_the_lease(
    laion_sample, ray_session, s3_endpoint, tmp_path
):
    """On a bucket (no rename): a killed `curate select` leaves CURRENT.json naming the old,
    complete version; the next select publishes and tidies. The run's lease object is created
    with a conditional write: a second writer is refused naming the holder, an expired lease
    (its holder was killed) is taken over."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from curate import run_lock

    fs = fsspec.filesystem("s3")
    fs.mkdir("curate-safe")
    src = pl.read_parquet(laion_sample).head(300)
    with fs.open("curate-safe/in/part-0.parquet", "wb") as f:
        src.write_parquet(f)
    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{"input.paths": ["s3://curate-safe/in/"], "output.dir": "s3://curate-safe/run"}
    )
    assert run(spec).ok
    run_dir = "s3://curate-safe/run"
    first = _sel(run_dir, "default")
    before = {p: fs.cat(p) for p in fs.find(first)}

    env = {**os.environ, "CURATE_PROGRESS": "0", "CURATE_FAILPOINT": f"publish.before_swap:{tmp_path / 'once'}"}
    curate = str(Path(sys.executable).with_name("curate"))
    res = subprocess.run(
        [curate, "select", run_dir, "--name", "default", "--min-words", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    fs.invalidate_cache()  # another process wrote: drop this one's cached listings
    assert _sel(run_dir, "default") == first  # the pointer still names the old version, byte for byte
    assert {p: fs.cat(p) for p in fs.find(first)} == before
    versions = [p for p in fs.ls("curate-safe/run/selections/default") if "/v-" in p]
    assert len(versions) == 2  # the killed writer's unfinished version sits beside it, unnamed

    res = CliRunner().invoke(app, ["select", run_dir, "--name", "default", "--min-words", "7"])
    assert res.exit_code == 0, res.output
    fs.invalidate_cache()
    now = _sel(run_dir, "default")
    assert now != first and json.loads(fs.cat(f"{now}/selection.json"))["rules"]["caption"]["min_words"] == 7
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("curate-safe/run/selections/default"))
    assert left == sorted(["CURRENT.json", first.rsplit("/", 1)[-1], now.rsplit("/", 1)[-1]])  # unfinished one gone

    # a file someone put beside the versions is never deleted by a publish
    fs.pipe("curate-safe/run/selections/default/notes.txt", b"mine")
    res = CliRunner().invoke(app, ["select", run_dir, "--name", "default", "--min-words", "5"])
    assert res.exit_code == 0, res.output
    fs.invalidate_cache()
    assert fs.cat("curate-safe/run/selections/default/notes.txt") == b"mine"
    # ... nor by deleting a selection (forget does, for one it cannot rebuild): curate's files go
    from curate import publish
    from curate.selection import owned, selection_dir

    publish.unpublish(selection_dir(run_dir, "default"), owned)
    fs.invalidate_cache()
    assert fs.find("curate-safe/run/selections/default") == ["curate-safe/run/selections/default/notes.txt"]

    # the lease: exactly one holder; the second is refused by name; an expired lease is taken over
    a = run_lock._Lease(run_dir, run_lock.describe_self("curate select A"))
    a.acquire()
    try:
        b = run_lock._Lease(run_dir, run_lock.describe_self("curate select B"))
        try:
            b.acquire()
            raise AssertionError("a second writer got the lease")
        except run_lock.RunDirBusy as e:
            assert "curate select A" in str(e) and f"pid {os.getpid()}" in str(e)
        res = CliRunner().invoke(app, ["select", run_dir, "--name", "other"])
        assert res.exit_code == 2 and "curate select A" in res.output, res.output
    finally:
        a.release()
    assert not fs.exists("curate-safe/run/.curate.lock")
    with fs.open("curate-safe/run/.curate.lock", "wb") as f:  # a holder that was killed: never renewed
        f.write(
            json.dumps(
                {
                    "command": "curate run (killed)",
                    "pid": 1,
                    "host": "h",
                    "since": "x",
                    "token": "dead",
                    "expires": time.time() - 1,
                }
            ).encode()
        )
    c = run_lock._Lease(run_dir, run_lock.describe_self("curate select C"))
    c.acquire()
    c.release()
