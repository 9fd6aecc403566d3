"""One shape for stages (curate/stages/base.py): an Arrow table and the stage's config section in,
an Arrow table out, and resources the stage declares, which the runner asks for instead of
hard-coding them."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa

from curate import runner
from curate.config import parse_spec
from curate.executor import ClusterInfo, Resources
from curate.shard_jobs import PREPARE_STAGES, SCORE
from curate.stages.annotate import ANNOTATE, CAPTION_LSH
from curate.stages.base import Stage
from curate.stages.fetch import FETCH

SPEC = parse_spec(
    {"name": "t", "input": {"paths": ["x.parquet"]}, "annotate": {"language": False, "caption_minhash": True}}
)
ROWS = pa.table(
    {
        "shard": ["s"] * 3,
        "row": pa.array([0, 1, 2], pa.int64()),
        "uid": ["a" * 32, "b" * 32, "c" * 32],
        "url": ["http://example.com/a.jpg", "ftp://example.com/b.jpg", None],
        "caption": ["a red bicycle leaning on a wall", "two dogs", None],
    }
)


def test_every_stage_is_a_table_to_table_stage_with_declared_resources():
    for stage in (*PREPARE_STAGES, SCORE):
        assert isinstance(stage, Stage)
        assert stage.sections and all(hasattr(SPEC, s) for s in stage.sections), stage.name
        assert isinstance(stage.resources(), Resources)


def test_annotate_and_caption_lsh_add_columns_and_keep_every_row():
    out = CAPTION_LSH(ANNOTATE(ROWS, SPEC, "s"), SPEC, "s")
    assert isinstance(out, pa.Table) and out.num_rows == ROWS.num_rows
    assert out.column("row").to_pylist() == [0, 1, 2]
    for col in ("caption_words", "domain", "url_normalized", "caption_lsh", "caption_lsh_ngram"):
        assert col in out.column_names, col
    assert out.column("caption_lsh_ngram").to_pylist() == [2, 2, None]  # no caption, no keys
    off = SPEC.with_overrides(**{"annotate.caption_minhash": False})
    assert CAPTION_LSH(ROWS, off, "s") is ROWS  # switched off: the table unchanged


def test_fetch_gives_one_status_row_per_input_row_and_image_bytes_only_for_ok():
    rows = ROWS.select(["row", "url"]).slice(1)  # an ftp URL and a null URL: refused without a socket
    out = FETCH(rows, SPEC, "s")
    assert out.column("row").to_pylist() == [1, 2]
    assert out.column("fetch_status").to_pylist() == ["bad_url", "bad_url"]
    assert out.column("jpg").null_count == 2


def test_the_runner_asks_the_stages_for_resources():
    from curate.layout import resolve

    node = ClusterInfo(None, cpus=16, gpus=0, nodes=1)
    declared = max(s.cpus for s in PREPARE_STAGES)
    assert runner.prepare_resources(resolve(SPEC.score, node)) == Resources(cpus=declared, gpus=0.0)
    spec = SPEC.with_overrides(**{"ray.scorer_resources": {"accel": 1}})
    on_gpus = runner.scorer_resources(spec, ClusterInfo(None, cpus=16, gpus=2, nodes=1))
    assert on_gpus.gpus == 1.0 and on_gpus.custom == {"accel": 1.0} and on_gpus.cpus >= SCORE.cpus
    assert runner.scorer_resources(spec, ClusterInfo(None, cpus=16, gpus=0, nodes=1)).gpus == 0.0
    # no resource figure is written in the runner itself: it takes them from the stages and the layout
    tree = ast.parse(Path(runner.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Resources"]
    literal = [ast.unparse(c) for c in calls if any(isinstance(x, ast.Constant) for x in ast.walk(c))]
    assert calls and not literal, literal
