"""input.format = "webdataset": a pool img2dataset already downloaded, as `curate run` input
(curate/webdataset_input.py; docs/FETCH.md "Pools already downloaded").

Real parts throughout: img2dataset itself downloads the demo's images from loopback image servers
into a webdataset pool (in this process, its multiprocessing distributor with one worker), curate
runs on Ray with the bundled small CLIP, and the same URLs are fetched by curate's own fetch for
comparison. The bad-input tests build small pools by hand with tarfile and pyarrow."""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import FetchConfig, InputConfig, SpecError, load_spec, parse_spec
from curate.demo.data import SITES
from curate.demo.image_server import ImageServer
from curate.demo.run_demo import write_inputs
from curate.executor import LocalExecutor
from curate.export import export
from curate.selection import uids_to_datacomp
from curate.presets import preset_path
from curate.runner import run
from curate.schema import FetchStatus
from curate.stages.fetch import FETCH, FetchError
from curate.stages.read import ShardReadError, compute_uids, footer_rows, list_shards, read_shard
from curate.webdataset_input import fetch_status

ROWS, SEED = 90, 7
PER_TAR = 40  # img2dataset's number_sample_per_shard: the pool has several tars
IMAGE_SIZE = 128  # below most demo images' short side (64-200 px): both paths downscale some, keep others
# img2dataset settings that store exactly what curate's fetch stores. curate's fetch hands a plain,
# upright, complete JPEG/PNG to img2dataset's own Resizer as served (curate/fetching/images.py,
# fast path) and builds that Resizer with image_size = fetch.image_size, resize_mode="keep_ratio",
# resize_only_if_bigger=True, encode_format="jpg" and the default encode_quality=95, re-encoding
# always (curate/stages/fetch.py _make_resizer). With the same arguments here, one Resizer gets the
# same bytes in both paths and writes the same JPEG: the stored images are byte-identical, so the
# CLIP scores and the selection must be too. (An image curate normalises first -- EXIF-rotated,
# CMYK, 16-bit, palette, GIF/WebP -- would reach the Resizer as other bytes and could differ by
# JPEG rounding; the demo serves none.)
MATCHED_RESIZE = dict(
    image_size=IMAGE_SIZE,
    resize_mode="keep_ratio",
    resize_only_if_bigger=True,
    encode_format="jpg",
    encode_quality=95,
    skip_reencode=False,
)
HTML = b"<!doctype html><html><body>this is a web page, not an image</body></html>"
CORRUPT = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3  # a JPEG signature, then no JPEG


def img2dataset_download(input_path: Path, pool: Path, **kw) -> None:
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # no version check over the network (its spawned worker too)
    # lazy: img2dataset (cv2, albumentations) takes seconds; only the tests that make a pool need it
    import img2dataset

    img2dataset.download(
        url_list=str(input_path),
        input_format="parquet",
        output_format="webdataset",
        output_folder=str(pool),
        processes_count=1,
        thread_count=4,
        distributor="multiprocessing",
        enable_wandb=False,
        number_sample_per_shard=PER_TAR,
        timeout=5,
        retries=0,
        **MATCHED_RESIZE,
        **kw,
    )


def demo_dict(**sections) -> dict:
    """The demo spec (pipelines/demo.toml) with its sections replaced; fp32 scoring so that a score
    computed in another batch agrees to 1e-6 (bf16 on a CPU that has it would not)."""
    d = load_spec(preset_path("demo")).model_dump(mode="json")
    d["score"]["precision"] = "fp32"
    d.update(sections)
    return d


def pool_spec(paths: list[str], out: Path, **more) -> dict:
    return demo_dict(
        input={"paths": paths, "format": "webdataset", "keep_columns": ["site"]},
        fetch={},  # every fetch setting at its default: the pool is not fetched
        output={"dir": str(out), "overwrite": True},
        **more,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """The demo's image servers and its input (one LAION-layout shard) plus a URL that 404s, one that
    serves an HTML page and one that serves a corrupt JPEG; img2dataset's pool of it; curate runs on
    the pool and, fetching, on the input."""
    out = tmp_path_factory.mktemp("wds")
    with contextlib.ExitStack() as stack:
        servers = {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}
        truth = write_inputs(out, ROWS, 1, SEED, servers)
        shard = out / "input" / "shards" / "part-00000.parquet"
        english = truth.filter((pl.col("gt_language") == "en") & (pl.col("row_kind") == "unique"))["TEXT"]
        extra = {
            "missing": servers["127.0.0.1"].url("/never-served.jpg"),
            "html": servers["127.0.0.2"].add("/page.html", HTML, content_type="text/html"),
            "corrupt": servers["127.0.0.3"].add("/corrupt.jpg", CORRUPT),
        }
        rows = pl.read_parquet(shard)
        added = pl.DataFrame({"URL": list(extra.values()), "TEXT": english[:3].to_list(), "site": ["extra"] * 3})
        pl.concat([rows, added]).write_parquet(shard)

        pool = out / "pool"
        img2dataset_download(shard.parent, pool, url_col="URL", caption_col="TEXT", save_additional_columns=["site"])

        fetched_spec = demo_dict(
            input={"paths": [str(shard.parent)], "layout": "laion", "keep_columns": ["site"]},
            output={"dir": str(out / "fetched"), "overwrite": True},
        )
        fetched_spec["fetch"]["image_size"] = IMAGE_SIZE
        fetched = run(parse_spec(fetched_spec))
        assert fetched.ok, fetched.failed
        pooled = run(parse_spec(pool_spec([str(pool)], out / "pooled")))
        assert pooled.ok, pooled.failed
        yield {"out": out, "pool": pool, "extra": extra, "fetched": fetched, "pooled": pooled, "servers": servers}


def annotations(run_dir: str) -> pl.DataFrame:
    return pl.read_parquet(Path(run_dir) / "annotations" / "*.parquet")


def image_cache(run_dir: str) -> pl.DataFrame:
    """uid -> stored bytes, from the run's images/<shard>.parquet files."""
    ann = annotations(run_dir).select("shard", "row", "uid")
    parts = [
        pl.read_parquet(p).with_columns(pl.lit(p.stem).alias("shard"))
        for p in sorted((Path(run_dir) / "images").glob("*.parquet"))
    ]
    return pl.concat(parts).join(ann, on=["shard", "row"]).select("uid", "jpg")


def decisions(run_dir: str) -> pl.DataFrame:
    sel = Path(run_dir) / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed")


def pool_rows(pool: Path) -> pl.DataFrame:
    """Every row of the pool's parquets, with its shard and the uid curate derives for it."""
    parts = [pl.read_parquet(p).with_columns(pl.lit(p.stem).alias("shard")) for p in sorted(pool.glob("*.parquet"))]
    rows = pl.concat(parts)
    return rows.with_columns(pl.Series("uid", compute_uids(rows["url"].to_list(), rows["caption"].to_list())))


def tar_images(pool: Path) -> dict[str, bytes]:
    """key -> the .jpg member's bytes, read with tarfile's stream mode (not curate's reader)."""
    out = {}
    for tar in sorted(pool.glob("*.tar")):
        with tarfile.open(tar, mode="r|") as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = tf.extractfile(m).read()
    return out


# --- a real downloader's output as input --------------------------------------------------------------
def test_pool_scores_are_those_of_the_stored_bytes(world):
    """Every ok row's clip_score is the model's score of the image in the tar (the same scoring
    function, called here on the bytes read from the tars), and the run's image cache holds those
    bytes."""
    # lazy: the scorer imports torch and open_clip (seconds)
    from curate.stages.score import ClipScorer

    pooled = world["pooled"]
    ann = annotations(pooled.run_dir)
    rows = pool_rows(world["pool"])
    tars = tar_images(world["pool"])
    ok = ann.filter(pl.col("fetch_status") == "ok").join(rows.select("uid", "key"), on="uid")
    # every image in the tars was scored, but for rows a text rule removed first (never read)
    attempted = ann.filter(pl.col("fetch_status") != "not_attempted").join(rows.select("uid", "key"), on="uid")
    assert ok.height >= 60 and ok.height == len(set(attempted["key"]) & set(tars))
    spec = parse_spec(pool_spec([str(world["pool"])], world["out"] / "unused"))
    images = [tars[k] for k in ok["key"]]
    direct = ClipScorer(spec.score).score(images, ok["caption"].to_list())
    assert np.isfinite(direct).all()
    np.testing.assert_allclose(ok["clip_score"].to_numpy(), direct, rtol=0, atol=1e-6)
    cache = image_cache(pooled.run_dir).join(ok.select("uid", "key"), on="uid")
    assert cache.height == ok.height
    assert all(jpg == tars[key] for jpg, key in zip(cache["jpg"], cache["key"]))


def test_pool_and_fetch_store_the_same_images_and_select_the_same_rows(world):
    """With img2dataset's resize settings matched to curate's fetch, the pool holds the very bytes
    curate's fetch stores; scores, kept uids and every row's removal reason agree."""
    fetched, pooled = world["fetched"].run_dir, world["pooled"].run_dir
    a, b = image_cache(fetched), image_cache(pooled)
    assert a.height == b.height >= 60
    both = a.join(b, on="uid", suffix="_pool")
    assert both.height == a.height and (both["jpg"] == both["jpg_pool"]).all()
    resized = annotations(pooled).filter(pl.col("width") < pl.col("original_width"))
    assert resized.height >= 5  # the downscale rule was exercised, not only the re-encode
    sa = annotations(fetched).select("uid", "clip_score", "image_sha256", "width", "height", "original_width")
    sb = annotations(pooled).select("uid", "clip_score", "image_sha256", "width", "height", "original_width")
    j = sa.join(sb, on="uid", suffix="_pool").filter(pl.col("clip_score").is_not_null())
    assert j.height == a.height
    np.testing.assert_allclose(j["clip_score"], j["clip_score_pool"], rtol=0, atol=1e-6)
    for col in ("image_sha256", "width", "height", "original_width"):
        assert (j[col] == j[f"{col}_pool"]).all(), col
    da, db = decisions(fetched), decisions(pooled)
    assert set(da.filter(pl.col("kept"))["uid"]) == set(db.filter(pl.col("kept"))["uid"])
    assert db.filter(pl.col("kept")).height >= 20
    reasons = da.select("uid", "reason").join(db.select("uid", "reason"), on="uid", suffix="_pool")
    assert reasons.height == da.height == db.height
    assert reasons.filter(pl.col("reason").ne_missing(pl.col("reason_pool"))).height == 0


def test_rows_img2dataset_failed_keep_their_rows_with_a_reason(world):
    """A 404, an HTML page and a corrupt JPEG: img2dataset's failed_to_download / failed_to_resize
    rows are kept with curate's status and removed as fetch_failed; kept + removed = the rows in
    the pool's parquets, per shard and overall."""
    pooled = world["pooled"]
    rows = pool_rows(world["pool"])
    d = decisions(pooled.run_dir)
    by_url = d.join(rows.select("uid", "status", "error_message"), on="uid")
    expected = {
        "missing": ("http_4xx", "HTTP Error 404"),
        "html": ("decode_error", ""),
        "corrupt": ("decode_error", ""),
    }
    for name, url in world["extra"].items():
        row = by_url.filter(pl.col("url") == url)
        assert row.height == 1, name
        status, message = expected[name]
        assert row["fetch_status"][0] == status and row["reason"][0] == "fetch_failed", (name, row.to_dicts())
        assert row["fetch_error"][0].startswith(f"img2dataset {row['status'][0]}: {message}"), row["fetch_error"][0]
        assert not row["kept"][0]
    assert rows.filter(pl.col("status") != "success").height >= 3
    summary = json.loads((Path(pooled.run_dir) / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] is True
    assert summary["counts"]["kept"] + summary["counts"]["removed"] == rows.height == d.height
    per_shard = dict(rows.group_by("shard").len().iter_rows())
    assert len(per_shard) == 3  # 93 rows, 40 per tar
    for shard, c in summary["shards"].items():
        assert c["kept"] + c["removed"] == c["rows"] == per_shard[shard]
    assert d.filter(pl.col("kept").not_())["reason"].null_count() == 0
    assert set(d["fetch_status"]) <= {"ok", "http_4xx", "decode_error", "not_attempted"}
    m = json.loads((Path(pooled.run_dir) / "manifest.json").read_text())
    assert [i["path"] for i in m["inputs"]] == [str(p) for p in sorted(world["pool"].glob("*.tar"))]
    # the manifest does not claim curate's own fetch prepared these images or honoured its opt-outs
    assert "resizer" not in m["preprocessing"]["fetch"] and "webdataset pool" in m["preprocessing"]["fetch"]["source"]
    assert m["opt_out"]["x_robots_tag"] is None


def test_a_uid_subset_of_the_pool_exports_exactly_those_uids(world, tmp_path):
    """DataComp's resharder step on a pool img2dataset downloaded: a uid list (every other row of
    the pool, downloaded or not) exports exactly those uids, each with the image bytes of its
    pool tar; a listed row img2dataset could not download is listed missing, never dropped."""
    rows = pool_rows(world["pool"]).sort("shard", "key")
    listed = rows[::2]
    uid_file = tmp_path / "subset.npy"
    np.save(uid_file, uids_to_datacomp(listed["uid"].to_list()))
    to = tmp_path / "subset"
    summary = export(world["pooled"].run_dir, str(to), "webdataset", uids=str(uid_file), shard_size=7)
    exported: dict[str, bytes] = {}
    for tar in sorted(to.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                exported[json.loads(data)["uid"]] = members[name[: -len(".json")] + ".jpg"]
    missing = set(pl.read_parquet(to / "_missing.parquet")["uid"]) if (to / "_missing.parquet").exists() else set()
    assert set(exported) | missing == set(listed["uid"]) and not set(exported) & missing
    # the run read an image from the pool for every downloaded row its text rules left worth
    # fetching: exactly those are exported, each with its pool tar's bytes
    cached = set(image_cache(world["pooled"].run_dir)["uid"])
    ok = listed.filter((pl.col("status") == "success") & pl.col("uid").is_in(list(cached)))
    assert set(exported) == set(ok["uid"]) and 0 < len(ok) < len(listed)
    assert listed.filter(pl.col("status") != "success")["uid"].is_in(list(missing)).all()
    images = tar_images(world["pool"])
    for key, uid in zip(ok["key"], ok["uid"]):
        assert exported[uid] == images[key], key
    assert summary["counts"]["exported"] + summary["counts"]["missing"] == len(listed)


def _hits(world) -> Counter:
    return sum((s.hits for s in world["servers"].values()), start=Counter())


def test_the_pool_run_makes_no_request(world, tmp_path):
    """Another run on the pool, while the image servers still serve: they see no request at all."""
    before = _hits(world)
    res = run(parse_spec(pool_spec([str(world["pool"])], tmp_path / "again")), executor=LocalExecutor())
    assert res.ok, res.failed
    assert _hits(world) == before
    assert res.selection["counts"]["rows"] == pool_rows(world["pool"]).height


# --- DataComp-style pool -------------------------------------------------------------------------------
def test_datacomp_pool_keeps_its_uids(world, tmp_path):
    """A pool made from DataComp-layout metadata with save_additional_columns=["uid"]: the run's
    uids are the pool's own (lower-cased), not md5(url, caption)."""
    src = pl.read_parquet(world["out"] / "input" / "shards" / "part-00000.parquet").head(24)
    rng = np.random.default_rng(3)
    uids = [rng.bytes(16).hex() for _ in range(src.height)]
    uids[0] = uids[0].upper()  # DataComp's uids are hex; case is not significant
    (tmp_path / "meta").mkdir()
    pl.DataFrame({"uid": uids, "url": src["URL"], "text": src["TEXT"]}).write_parquet(tmp_path / "meta" / "m.parquet")
    pool = tmp_path / "pool"
    img2dataset_download(tmp_path / "meta", pool, url_col="url", caption_col="text", save_additional_columns=["uid"])
    rows = pl.concat(
        [pl.read_parquet(p).with_columns(pl.lit(p.stem).alias("shard")) for p in sorted(pool.glob("*.parquet"))]
    )
    assert "uid" in rows.columns and rows.height == src.height
    spec = parse_spec(
        {
            "name": "dc",
            "input": {"paths": [str(pool)], "format": "webdataset"},
            "score": {"source": "none"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    res = run(spec, executor=LocalExecutor())
    assert res.ok, res.failed
    ann = annotations(res.run_dir)
    assert sorted(ann["uid"]) == sorted(u.lower() for u in uids)
    by_position = ann.join(
        rows.with_columns(pl.int_range(pl.len()).over("shard").alias("row")).select(
            "shard", "row", pl.col("uid").alias("pool_uid")
        ),
        on=["shard", "row"],
    )
    assert (
        by_position.height == rows.height and (by_position["uid"] == by_position["pool_uid"].str.to_lowercase()).all()
    )
    assert (ann["fetch_status"] == "ok").sum() >= 18 and res.selection["counts"]["rows"] == src.height


# --- a pool on s3:// -----------------------------------------------------------------------------------
def test_pool_on_s3_reads_as_the_same_pool_on_disk(world, tmp_path, s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.mkdir("curate-wds")
    for p in sorted(world["pool"].iterdir()):
        fs.put(str(p), f"curate-wds/pool/{p.name}")
    res = run(parse_spec(pool_spec(["s3://curate-wds/pool"], tmp_path / "s3run")))
    assert res.ok, res.failed
    cols = ["shard", "row", "uid", "url", "caption", "fetch_status", "fetch_error", "width", "height"]
    cols += ["original_width", "original_height", "image_sha256", "clip_score"]
    local = annotations(world["pooled"].run_dir).select(cols).sort("shard", "row")
    remote = annotations(res.run_dir).select(cols).sort("shard", "row")
    assert remote.drop("clip_score").equals(local.drop("clip_score"))
    np.testing.assert_allclose(remote["clip_score"].fill_null(-9), local["clip_score"].fill_null(-9), atol=1e-6)
    a, b = image_cache(world["pooled"].run_dir).sort("uid"), image_cache(res.run_dir).sort("uid")
    assert a.equals(b)
    assert set(decisions(res.run_dir).filter(pl.col("kept"))["uid"]) == set(
        decisions(world["pooled"].run_dir).filter(pl.col("kept"))["uid"]
    )


# --- img2dataset's statuses --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,message,expected",
    [
        ("success", None, FetchStatus.OK),
        ("failed_to_download", "HTTP Error 404: Not Found", FetchStatus.HTTP_4XX),
        ("failed_to_download", "HTTP Error 403: Forbidden", FetchStatus.HTTP_4XX),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", FetchStatus.HTTP_5XX),
        ("failed_to_download", "HTTP Error 429: Too Many Requests", FetchStatus.RATE_LIMITED),
        ("failed_to_download", "HTTP Error 408: Request Timeout", FetchStatus.TIMEOUT),
        (
            "failed_to_download",
            "HTTP Error 308: The HTTP server returned a redirect error that would lead to an infinite loop.",
            FetchStatus.TOO_MANY_REDIRECTS,
        ),
        ("failed_to_download", "timed out", FetchStatus.TIMEOUT),
        ("failed_to_download", "The read operation timed out", FetchStatus.TIMEOUT),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", FetchStatus.CONNECTION_ERROR),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", FetchStatus.CONNECTION_ERROR),
        ("failed_to_download", "Remote end closed connection without response", FetchStatus.CONNECTION_ERROR),
        ("failed_to_download", "unknown url type: 'notaurl'", FetchStatus.BAD_URL),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", FetchStatus.OPT_OUT),
        ("failed_to_download", "hash mismatch", FetchStatus.HASH_MISMATCH),
        ("failed_to_download", "something else entirely", FetchStatus.DOWNLOAD_FAILED),
        ("failed_to_download", None, FetchStatus.DOWNLOAD_FAILED),
        ("failed_to_resize", "Image decoding error", FetchStatus.DECODE_ERROR),
        ("failed_to_resize", "image too small", FetchStatus.DECODE_ERROR),
        ("failed_to_resize", "image area too large", FetchStatus.TOO_MANY_PIXELS),
    ],
)
def test_img2dataset_statuses_map_onto_curates(status, message, expected):
    assert fetch_status(status, message) is expected


# --- bad input -----------------------------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    buf = _io.BytesIO()
    Image.new("RGB", (40, 30), (seed * 40 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def make_pool(folder: Path, name: str, rows: list[tuple[str, str, bytes | None]], members: bool = True) -> Path:
    """A pool shard as img2dataset lays it out: (key, status, image) per row; the tar holds
    {key}.jpg/.txt/.json for each success row whose image is given."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / f"{name}.tar"
    with tarfile.open(tar, "w") as tf:
        for key, status, image in rows:
            if status != "success" or image is None or not members:
                continue
            for ext, data in (("jpg", image), ("txt", f"caption {key}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, _io.BytesIO(data))
    ok = [s == "success" for _, s, _ in rows]
    pq.write_table(
        pa.table(
            {
                "url": [f"http://example.com/{k}.jpg" for k, _, _ in rows],
                "caption": [f"caption {k}" for k, _, _ in rows],
                "key": [k for k, _, _ in rows],
                "status": [s for _, s, _ in rows],
                "error_message": [None if o else "HTTP Error 404: Not Found" for o in ok],
                "width": pa.array([40 if o else None for o in ok], pa.int32()),
                "height": pa.array([30 if o else None for o in ok], pa.int32()),
                "original_width": pa.array([40 if o else None for o in ok], pa.int32()),
                "original_height": pa.array([30 if o else None for o in ok], pa.int32()),
                "sha256": [hashlib.sha256(i).hexdigest() if o and i else None for (_, _, i), o in zip(rows, ok)],
            }
        ),
        folder / f"{name}.parquet",
    )
    return tar


def _spec_dict(pool: Path | str, out: Path) -> dict:
    return {
        "name": "t",
        "input": {"paths": [str(pool)], "format": "webdataset"},
        "score": {"source": "none"},
        "annotate": {"language": False},
        "output": {"dir": str(out)},
    }


def fetch_pool(tar: Path, rows: list[int]) -> pa.Table:
    spec = parse_spec(_spec_dict(tar.parent, tar.parent / "run"))
    return FETCH(pa.table({"row": pa.array(rows, pa.int64()), "url": ["u"] * len(rows)}), spec, tar.stem)


def test_a_hand_made_pool_reads_its_rows_and_images(tmp_path):
    a, b = _jpeg(1), _jpeg(2)
    tar = make_pool(tmp_path, "00000", [("k0", "success", a), ("k1", "failed_to_download", None), ("k2", "success", b)])
    cfg = InputConfig(paths=[str(tmp_path)], format="webdataset")
    assert list_shards(cfg) == [str(tar)]
    t = read_shard(str(tar), cfg)
    assert t.column("shard").to_pylist() == ["00000"] * 3 and t.column("row").to_pylist() == [0, 1, 2]
    assert t.column("uid").to_pylist() == compute_uids(t.column("url").to_pylist(), t.column("caption").to_pylist())
    out = fetch_pool(tar, [0, 1, 2])
    assert out.column("fetch_status").to_pylist() == ["ok", "http_4xx", "ok"]
    assert out.column("jpg").to_pylist() == [a, None, b]
    assert out.column("image_sha256").to_pylist() == [
        hashlib.sha256(a).hexdigest(),
        None,
        hashlib.sha256(b).hexdigest(),
    ]
    assert out.column("width").to_pylist() == [40, None, 40]
    # a window of rows reads only those rows
    assert fetch_pool(tar, [2]).column("jpg").to_pylist() == [b]
    assert footer_rows(str(tar)) == 3


def test_a_success_row_without_its_image_member_is_a_row_failure(tmp_path):
    tar = make_pool(tmp_path, "00000", [("k0", "success", _jpeg(1)), ("k1", "success", None)])
    out = fetch_pool(tar, [0, 1])
    assert out.column("fetch_status").to_pylist() == ["ok", "lost"]
    err = out.column("fetch_error")[1].as_py()
    assert str(tar) in err and "k1.jpg" in err
    assert out.column("jpg")[1].as_py() is None


def test_a_tar_without_its_parquet_is_an_error_naming_both(tmp_path):
    tar = make_pool(tmp_path, "00007", [("k0", "success", _jpeg(1))])
    (tmp_path / "00007.parquet").unlink()
    cfg = InputConfig(paths=[str(tmp_path)], format="webdataset")
    assert list_shards(cfg) == [str(tar)]
    with pytest.raises(ShardReadError) as e:
        read_shard(str(tar), cfg)
    assert str(tar) in str(e.value) and "00007.parquet" in str(e.value)


def test_a_parquet_without_its_tar_is_refused_when_listing(tmp_path):
    make_pool(tmp_path, "00000", [("k0", "success", _jpeg(1))])
    make_pool(tmp_path, "00001", [("k0", "success", _jpeg(1))])
    (tmp_path / "00001.tar").unlink()
    with pytest.raises(ShardReadError, match=r"00001\.parquet.*00001\.tar is missing"):
        list_shards(InputConfig(paths=[str(tmp_path)], format="webdataset"))
    with pytest.raises(ShardReadError, match="no .tar files"):
        list_shards(InputConfig(paths=[str(tmp_path / "00001.parquet")], format="webdataset"))


def _second_header(tar: bytes) -> int:
    with tarfile.open(fileobj=_io.BytesIO(tar)) as tf:
        return tf.getmembers()[1].offset


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda b: b"this is not a tar archive at all" * 40, "not a readable tar file"),
        (lambda b: b[:700], "truncated"),  # the first member's data cut short
        (  # the second member's header overwritten: tarfile alone would stop there as if at the end
            lambda b: b[: _second_header(b)] + b"\x01" * 512 + b[_second_header(b) + 512 :],
            "no valid member header",
        ),
        (lambda b: b"", "not a readable tar file"),
    ],
)
def test_a_corrupt_tar_is_an_error_naming_it(tmp_path, damage, expected):
    tar = make_pool(tmp_path, "00000", [("k0", "success", _jpeg(1)), ("k1", "success", _jpeg(2))])
    tar.write_bytes(damage(tar.read_bytes()))
    with pytest.raises(FetchError) as e:
        fetch_pool(tar, [0, 1])
    assert str(tar) in str(e.value) and expected in str(e.value) and "'00000'" in str(e.value)


@pytest.mark.parametrize(
    "rows,match",
    [
        ([("k0", "succeeded", None)], r"column 'status'.*'succeeded' \(row 0\)"),
        ([("k0", "success", None), ("k0", "success", None)], r"column 'key': key 'k0' at rows 0 and 1"),
    ],
)
def test_a_parquet_img2dataset_could_not_have_written_is_refused_naming_the_column(tmp_path, rows, match):
    tar = make_pool(tmp_path, "00000", rows, members=False)
    with pytest.raises(ShardReadError, match=match) as e:
        read_shard(str(tar), InputConfig(paths=[str(tmp_path)], format="webdataset"))
    assert "00000.parquet" in str(e.value)


def test_a_run_with_a_corrupt_tar_fails_that_shard_only_and_names_it(tmp_path):
    make_pool(tmp_path / "pool", "00000", [("a", "success", _jpeg(1)), ("b", "failed_to_download", None)])
    bad = make_pool(tmp_path / "pool", "00001", [("c", "success", _jpeg(2)), ("d", "success", _jpeg(3))])
    bad.write_bytes(bad.read_bytes()[:600])
    res = run(parse_spec(_spec_dict(tmp_path / "pool", tmp_path / "run")), executor=LocalExecutor())
    assert list(res.failed) == ["00001"] and str(bad) in res.failed["00001"]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["unaccounted_rows"] == {"00001": 2}  # from the parquet beside the tar
    assert m["counts"]["rows"] == 2


# --- config --------------------------------------------------------------------------------------------
def test_input_format_is_validated():
    assert InputConfig(paths=["x"]).format == "parquet"
    assert InputConfig(paths=["x"], format="webdataset").format == "webdataset"
    with pytest.raises(ValueError, match="format"):
        InputConfig(paths=["x"], format="tfrecord")
    with pytest.raises(ValueError, match="input.layout = 'datacomp' does not apply"):
        InputConfig(paths=["x"], format="webdataset", layout="datacomp")
    with pytest.raises(ValueError, match="input.caption_column = 'TEXT' does not apply"):
        InputConfig(paths=["x"], format="webdataset", caption_column="TEXT")
    assert InputConfig(paths=["x"], format="webdataset", uid_column="my_uid").uid_column == "my_uid"


def test_webdataset_skips_the_network_fetch_and_refuses_its_settings():
    """fetch.enabled = true with a pool means "take the images from the tars" (no request); any other
    fetch setting would do nothing and is refused, naming it."""
    base = {"name": "t", "input": {"paths": ["pool"], "format": "webdataset"}}
    spec = parse_spec(base)
    assert spec.fetch == FetchConfig() and spec.needs_images
    with pytest.raises(SpecError) as e:
        parse_spec({**base, "fetch": {"image_size": 256, "allow_networks": ["127.0.0.0/8"]}})
    assert "fetch.allow_networks" in str(e.value) and "fetch.image_size" in str(e.value)
    off = parse_spec({**base, "fetch": {"enabled": False}, "score": {"source": "column", "column": "similarity"}})
    assert not off.needs_images
    # a copy with overrides (as the runner makes) stays valid
    assert spec.with_overrides(**{"score.window_rows": 16}).input.format == "webdataset"
