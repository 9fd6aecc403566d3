"""`curate export` (docs/EXPORT.md) on a real run: the demo pipeline's images fetched from loopback
servers and scored by the bundled CLIP, then exported on real Ray. The tars are read back with the
`webdataset` package and every sample held against the selection's kept rows and the run's image
cache; a SIGKILLed export is resumed to the same bytes; a bucket export goes through moto's S3."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner

from curate.cli import app
from curate.demo.run_demo import demo_spec, write_inputs
from curate.executor import LocalExecutor
from curate.export import export
from curate.runner import run
from curate.selection import uids_to_datacomp
from fault_support import demo_servers, run_in_session

ROWS, SHARDS, SEED = 80, 3, 5
SHARD_SIZE = 5
CURATE = str(Path(sys.executable).with_name("curate"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A demo run: fetched images in images/<shard>.parquet, the default selection written. Made
    in-process (the run is not what these tests exercise); the exports run on Ray."""
    out = tmp_path_factory.mktemp("export-demo")
    with demo_servers() as servers:
        write_inputs(out, ROWS, SHARDS, SEED, servers)
        result = run(demo_spec(out), executor=LocalExecutor())
    assert result.ok, result.failed
    return out / "run"


@pytest.fixture(scope="module")
def reference(demo_run, tmp_path_factory, ray_session) -> Path:
    """An uninterrupted webdataset export of the default selection, SHARD_SIZE rows a tar."""
    to = tmp_path_factory.mktemp("export-reference") / "wds"
    summary = export(str(demo_run), str(to), "webdataset", selection="default", shard_size=SHARD_SIZE)
    assert summary["reconciles"] and summary["skipped_shards"] == 0
    return to


# --- helpers ---------------------------------------------------------------------------------------
def kept_rows(run_dir: Path) -> pl.DataFrame:
    """The default selection's kept rows in the export's order: input shard, then row."""
    return pl.read_parquet(run_dir / "selections" / "default" / "kept" / "*.parquet").sort("shard", "row")


def cached_images(run_dir: Path) -> dict[tuple[str, int], bytes]:
    out = {}
    for p in sorted((run_dir / "images").glob("*.parquet")):
        t = pq.read_table(p)
        out.update({(p.stem, r): b for r, b in zip(t["row"].to_pylist(), t["jpg"].to_pylist())})
    return out


def expected_json(row: dict, key: str) -> dict:
    """What a sample's json must hold for its row (written out here, not taken from curate)."""
    return {
        "url": row["url"],
        "caption": row["caption"],
        "uid": row["uid"],
        "clip_score": row["clip_score"],
        "language": row["language"],
        "domain": row["domain"],
        "source_shard": row["shard"],
        "source_row": row["row"],
        "key": key,
        "status": "success",
        "error_message": None,
        "width": row["width"],
        "height": row["height"],
        "original_width": row["original_width"],
        "original_height": row["original_height"],
        "sha256": row["image_sha256"],
    }


def samples(folder: Path) -> list[dict]:
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def cli(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def key(position: int, shard_size: int = SHARD_SIZE) -> str:
    """img2dataset's key of the row at `position` of the export (shard_size < 10: one digit)."""
    assert shard_size < 10
    return f"{(position // shard_size) * 10 + position % shard_size:06d}"


# --- the webdataset layout -------------------------------------------------------------------------
def test_every_kept_row_is_a_sample_with_its_cached_image_and_metadata(demo_run, reference, tmp_path):
    res = cli(str(demo_run), "--to", str(tmp_path / "wds"), "--selection", "default", "--shard-size", str(SHARD_SIZE))
    assert res.exit_code == 0, res.output
    assert "counts reconcile: yes" in res.output
    # two exports of the same selection: the same bytes, file for file
    assert digests(tmp_path / "wds") == digests(reference)

    kept = kept_rows(demo_run)
    images = cached_images(demo_run)
    got = samples(reference)
    assert len(got) == kept.height > 20
    for i, (row, sample) in enumerate(zip(kept.iter_rows(named=True), got)):
        assert sample["__key__"] == key(i)
        assert json.loads(sample["json"]) == expected_json(row, key(i))
        assert sample["jpg"] == images[(row["shard"], row["row"])]  # the stored bytes, as stored
        assert sample["txt"].decode() == row["caption"]

    n_tars = -(-kept.height // SHARD_SIZE)
    names = [f"{k:05d}" for k in range(n_tars)]
    assert sorted(p.name for p in reference.glob("*.tar")) == [f"{n}.tar" for n in names]
    sizes = json.loads((reference / "sizes.json").read_text())
    assert sizes == {f"{n}.tar": min(SHARD_SIZE, kept.height - SHARD_SIZE * k) for k, n in enumerate(names)}
    for k, n in enumerate(names):
        with tarfile.open(reference / f"{n}.tar") as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == [
            f"{key(k * SHARD_SIZE + j)}.{ext}" for j in range(sizes[f"{n}.tar"]) for ext in ("jpg", "json", "txt")
        ]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
        index = pl.read_parquet(reference / f"{n}.parquet")  # img2dataset's per-tar index: the samples' json
        in_tar = [json.loads(s["json"]) for s in got[k * SHARD_SIZE : (k + 1) * SHARD_SIZE]]
        assert index.to_dicts() == in_tar
        stats = json.loads((reference / f"{n}_stats.json").read_text())
        assert stats == {
            "count": sizes[f"{n}.tar"],
            "successes": sizes[f"{n}.tar"],
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": sizes[f"{n}.tar"]},
        }
    summary = json.loads((reference / "_export.json").read_text())
    assert summary["counts"] == {"rows": kept.height, "exported": kept.height, "missing": 0, "kept": kept.height}
    assert summary["reconciles"] and summary["shards"] == n_tars and summary["source"]["selection"] == "default"
    assert pl.read_parquet(reference / "_missing.parquet").height == 0


def test_a_row_without_a_cached_image_is_listed_and_counted(demo_run, tmp_path, ray_session):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    kept = kept_rows(run_dir)
    gone = [kept.filter(pl.col("shard") == s).row(0, named=True) for s in ("part-00000", "part-00002")]
    for row in gone:  # the image cache lost these rows' images
        path = run_dir / "images" / f"{row['shard']}.parquet"
        t = pq.read_table(path)
        pq.write_table(t.filter(pa.compute.not_equal(t["row"], row["row"])), path)
    to = tmp_path / "wds"
    res = cli(str(run_dir), "--to", str(to), "--shard-size", str(SHARD_SIZE))
    assert res.exit_code == 0, res.output
    assert "2 row(s) have no image in the run's cache" in res.output and "counts reconcile: yes" in res.output

    got = samples(to)
    assert len(got) == kept.height - 2
    assert {json.loads(s["json"])["uid"] for s in got} == set(kept["uid"]) - {r["uid"] for r in gone}
    missing = pl.read_parquet(to / "_missing.parquet").sort("shard", "row")
    assert missing.select("uid", "shard", "row", "url").to_dicts() == [
        {k: r[k] for k in ("uid", "shard", "row", "url")} for r in gone
    ]
    assert all(str(run_dir / "images") in m for m in missing["error_message"])
    index = pl.concat([pl.read_parquet(p) for p in sorted(to.glob("0*.parquet"))])
    assert index.height == kept.height  # the index has every row; the missing ones say so
    assert sorted(index.filter(pl.col("status") == "failed_to_download")["uid"]) == sorted(r["uid"] for r in gone)
    stats = [json.loads(p.read_text()) for p in sorted(to.glob("*_stats.json"))]
    assert sum(s["failed_to_download"] for s in stats) == 2 and sum(s["successes"] for s in stats) == len(got)
    c = json.loads((to / "_export.json").read_text())["counts"]
    assert c["exported"] + c["missing"] == c["kept"] == kept.height and c["missing"] == 2


def test_a_uid_file_exports_exactly_the_rows_with_those_uids(demo_run, tmp_path, ray_session):
    ann = pl.read_parquet(demo_run / "annotations" / "*.parquet").sort("shard", "row")
    kept = kept_rows(demo_run)
    removed = ann.filter(~pl.col("uid").is_in(kept["uid"].implode()))
    absent = ["f" * 32, "0123456789abcdef" * 2]
    failed = removed.filter(pl.col("fetch_status") != "ok")  # in the run, but no image to export
    assert failed.height >= 2
    listed = kept["uid"].to_list()[::3] + removed.filter(pl.col("fetch_status") == "ok")["uid"].to_list()[::4]
    listed += failed["uid"].to_list()[:3] + absent
    uid_file = tmp_path / "subset.npy"
    np.save(uid_file, uids_to_datacomp(listed))

    to = tmp_path / "subset"
    res = cli(str(demo_run), "--to", str(to), "--uids", str(uid_file), "--shard-size", "4")
    assert res.exit_code == 0, res.output
    assert "2 of" in res.output and "listed uid(s) are not in the run" in res.output

    rows = ann.filter(pl.col("uid").is_in(pl.Series(listed).implode()))  # the run's rows, in export order
    images = cached_images(demo_run)
    with_image = [r for r in rows.iter_rows(named=True) if (r["shard"], r["row"]) in images]
    without = [r for r in rows.iter_rows(named=True) if (r["shard"], r["row"]) not in images]
    assert len(without) >= 2
    got = samples(to)
    assert [json.loads(s["json"])["uid"] for s in got] == [r["uid"] for r in with_image]
    for s, r in zip(got, with_image):
        assert s["jpg"] == images[(r["shard"], r["row"])]
    missing = pl.read_parquet(to / "_missing.parquet")
    assert sorted(missing["uid"]) == sorted(r["uid"] for r in without)
    summary = json.loads((to / "_export.json").read_text())
    assert summary["counts"] == {
        "rows": rows.height,
        "exported": len(with_image),
        "missing": len(without),
        "uids_listed": len(listed),
        "uids_distinct": len(listed),
        "uids_found": len(listed) - len(absent),
        "uids_not_found": len(absent),
    }
    assert summary["reconciles"]
    assert np.array_equal(np.load(to / "_uids_not_found.npy"), uids_to_datacomp(absent))

    bad = tmp_path / "not_uids.npy"
    np.save(bad, np.arange(4))
    res = cli(str(demo_run), "--to", str(tmp_path / "bad"), "--uids", str(bad))
    assert res.exit_code == 2 and str(bad) in res.output and "DataComp" in res.output, res.output


def test_parquet_format_reshards_the_kept_pairs_for_img2dataset(demo_run, tmp_path, ray_session):
    to = tmp_path / "pairs"
    res = cli(str(demo_run), "--to", str(to), "--format", "parquet", "--shard-size", "10")
    assert res.exit_code == 0, res.output
    kept = kept_rows(demo_run)
    files = sorted(to.glob("*.parquet"))
    assert [p.name for p in files] == [f"{k:05d}.parquet" for k in range(-(-kept.height // 10))]
    assert not list(to.glob("*.tar")) and not (to / "_missing.parquet").exists()
    parts = [pl.read_parquet(p) for p in files]
    assert [p.height for p in parts[:-1]] == [10] * (len(parts) - 1)
    pairs = pl.concat(parts)
    assert pairs.columns[:2] == ["url", "caption"]  # img2dataset's url_col / caption_col
    expected = kept.select(
        "url",
        "caption",
        "uid",
        "clip_score",
        "language",
        "domain",
        pl.col("shard").alias("source_shard"),
        pl.col("row").alias("source_row"),
        "original_width",
        "original_height",
        pl.col("image_sha256").alias("sha256"),
    )
    assert pairs.select(expected.columns).equals(expected)


# --- exactly once ----------------------------------------------------------------------------------
def test_a_sigkilled_export_resumes_to_the_bytes_of_an_uninterrupted_one(demo_run, reference, tmp_path, ray_session):
    to = tmp_path / "wds"
    worker_once, driver_once = tmp_path / "once-worker", tmp_path / "once-driver"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CURATE_FAILPOINT")}
    env.update(
        CURATE_PROGRESS="0",
        RAY_AUTH_MODE="disabled",
        # a shard task dies after its files and before its marker (Ray retries it), then the driver
        # dies once it has collected its first finished shard
        CURATE_FAILPOINT=f"export.before_marker:{worker_once},export.shard_done:{driver_once}",
    )
    res = run_in_session([CURATE, "export", str(demo_run), "--to", str(to), "--shard-size", str(SHARD_SIZE)], env, 300)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])
    assert json.loads(worker_once.read_text())["failpoint"] == "export.before_marker"
    assert json.loads(driver_once.read_text())["failpoint"] == "export.shard_done"
    assert not (to / "_export.json").exists()  # not a whole export
    done = sorted(p.stem for p in to.glob("*.done"))
    assert done, "the driver collected a shard before it died: that shard has its marker"
    before = {n: (to / f"{n}.tar").stat() for n in done}

    summary = export(str(demo_run), str(to), "webdataset", selection="default", shard_size=SHARD_SIZE)
    assert summary["skipped_shards"] == len(done) and summary["reconciles"]
    assert digests(to) == digests(reference)
    for n, st in before.items():  # complete shards are not written again
        now = (to / f"{n}.tar").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n


def test_a_rerun_rewrites_damaged_shards_and_only_those(demo_run, reference, tmp_path, ray_session):
    to = tmp_path / "wds"
    shutil.copytree(reference, to)
    (to / "00001.done").unlink()  # files written, marker not: a task that died before its marker
    (to / "00002.tar").write_bytes(b"not the tar the marker vouches for")
    (to / "00003_stats.json").unlink()
    (to / f"00004.tar.tmp-{'a' * 32}").write_bytes(b"a killed atomic write")
    untouched = {p.name: p.stat().st_mtime_ns for p in to.glob("*.tar") if p.stem not in ("00001", "00002", "00003")}
    summary = export(str(demo_run), str(to), "webdataset", selection="default", shard_size=SHARD_SIZE)
    assert summary["skipped_shards"] == summary["shards"] - 3
    assert digests(to) == digests(reference)  # the temp file is gone too
    assert {n: (to / n).stat().st_mtime_ns for n in untouched} == untouched

    # another shard size into the same folder: the old plan's extra shards go, nothing else is left
    summary = export(str(demo_run), str(to), "webdataset", selection="default", shard_size=100)
    assert summary["shards"] == 1 and summary["skipped_shards"] == 0
    assert sorted(p.name for p in to.iterdir()) == [
        "00000.done",
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "_curate_export.json",
        "_export.json",
        "_missing.parquet",
        "sizes.json",
    ]
    assert len(samples(to)) == kept_rows(demo_run).height


def test_a_folder_holding_files_curate_did_not_write_is_refused(demo_run, tmp_path):
    to = tmp_path / "mine"
    (to / "sub").mkdir(parents=True)
    (to / "notes.txt").write_text("mine")
    (to / "sub" / "00000.tar").write_bytes(b"mine too")
    res = cli(str(demo_run), "--to", str(to))
    assert res.exit_code == 2, res.output
    assert str(to) in res.output and "notes.txt" in res.output and "did not write" in res.output, res.output
    assert sorted(str(p.relative_to(to)) for p in to.rglob("*")) == ["notes.txt", "sub", "sub/00000.tar"]
    # an img2dataset pool: every name is one an export writes too, but no export claimed the folder
    pool = tmp_path / "pool"
    pool.mkdir()
    for name, data in {
        "00000.tar": b"tar",
        "00000.parquet": b"pq",
        "00000_stats.json": b"{}",
        "00001.tar": b"t",
    }.items():
        (pool / name).write_bytes(data)
    res = cli(str(demo_run), "--to", str(pool), "--shard-size", "1000000")
    assert res.exit_code == 2 and "_curate_export.json" in res.output and "00001.tar" in res.output, res.output
    assert {p.name: p.read_bytes() for p in pool.iterdir()} == {
        "00000.tar": b"tar", "00000.parquet": b"pq", "00000_stats.json": b"{}", "00001.tar": b"t"
    }  # fmt: skip
    res = cli(str(demo_run), "--to", str(demo_run / "export"))
    assert res.exit_code == 2 and "inside the run directory" in res.output, res.output
    res = cli(str(demo_run), "--to", str(tmp_path / "x"), "--selection", "default", "--uids", "u.npy")
    assert res.exit_code == 2 and "not both" in res.output, res.output


# --- buckets ---------------------------------------------------------------------------------------
def test_export_from_a_bucket_run_to_a_bucket(demo_run, reference, s3_endpoint, ray_session):
    fs = fsspec.filesystem("s3")
    with contextlib.suppress(FileExistsError):
        fs.mkdir("curate-export")
    for p in sorted(demo_run.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"curate-export/run/{p.relative_to(demo_run)}")
    summary = export(
        "s3://curate-export/run", "s3://curate-export/wds", "webdataset", selection="default", shard_size=SHARD_SIZE
    )
    assert summary["reconciles"] and summary["counts"]["exported"] == kept_rows(demo_run).height
    fs.invalidate_cache()
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.find("curate-export/wds"))
    assert written == sorted(p.name for p in reference.iterdir())
    for name in written:  # the same bytes as the local export (summary and markers name their run)
        if name != "_export.json" and not name.endswith(".done"):
            assert fs.cat(f"curate-export/wds/{name}") == (reference / name).read_bytes(), name
    again = export(
        "s3://curate-export/run", "s3://curate-export/wds", "webdataset", selection="default", shard_size=SHARD_SIZE
    )
    assert again["skipped_shards"] == again["shards"]
