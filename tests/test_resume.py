"""A rerun of a finished run fetches again only what failed transiently (here a 503), never
what failed for good (a 404) or what succeeded, and never duplicates a row."""

import contextlib

import polars as pl

from curate.executor import LocalExecutor
from curate.demo import synthetic
from curate.config import load_spec
from curate.demo.image_server import ImageServer
from curate.presets import preset_path
from curate.runner import run


def test_rerun_retries_only_transient_failures(tmp_path):
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ImageServer("127.0.0.1"))
        rows = []
        for i in range(12):
            a = synthetic.random_attrs(i)
            body = synthetic.to_jpeg(synthetic.render(a, i, 96, 96))
            status = 503 if i < 4 else (404 if i < 6 else 200)
            server.add(f"/img/{i}.jpg", body, status=status)
            rows.append({"URL": server.url(f"/img/{i}.jpg"), "TEXT": synthetic.caption(a, "en", i)})
        (tmp_path / "in").mkdir()
        pl.DataFrame(rows).with_columns(pl.lit("s").alias("site")).write_parquet(tmp_path / "in" / "part-0.parquet")
        spec = load_spec(preset_path("demo")).with_overrides(
            **{"input.paths": [str(tmp_path / "in")], "output.dir": str(tmp_path / "run"), "fetch.retries": 0}
        )
        assert run(spec, executor=LocalExecutor()).ok
        first = pl.read_parquet(tmp_path / "run" / "annotations" / "part-0.parquet").sort("row")
        assert first["fetch_status"].to_list()[:6] == ["http_5xx"] * 4 + ["http_4xx"] * 2
        hits_before = server.hits

        for i in range(4):  # the 503s recover
            a = synthetic.random_attrs(i)
            server.add(f"/img/{i}.jpg", synthetic.to_jpeg(synthetic.render(a, i, 96, 96)))
        assert run(spec, executor=LocalExecutor()).ok
        new = server.hits - hits_before
        assert sorted(new) == sorted(f"/img/{i}.jpg" for i in range(4))  # only the transient rows
        assert all(n == 1 for n in new.values())
        second = pl.read_parquet(tmp_path / "run" / "annotations" / "part-0.parquet").sort("row")
        assert second.height == 12 and second["row"].to_list() == list(range(12))
        assert second["fetch_status"].to_list()[:6] == ["ok"] * 4 + ["http_4xx"] * 2
        assert second["clip_score"][:4].null_count() == 0
        # rows that were fine the first time are untouched, scores included
        assert second[6:].select("fetch_status", "clip_score").equals(first[6:].select("fetch_status", "clip_score"))
        # a third run has nothing to do
        hits_before = server.hits
        assert run(spec, executor=LocalExecutor()).ok
        assert server.hits == hits_before
