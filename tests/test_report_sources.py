"""The report's questions answered by one frame (the local engine) and by blocks of it (the Ray
engine, here on the in-process executor): the same counts, the same first rows, the same
quantiles bit for bit (nulls, NaN, ties, empty groups), means to float summation order; also with
more blocks than the driver holds before it folds them (sources.FOLD_EVERY)."""

import numpy as np
import polars as pl
import pytest

from curate.executor import LocalExecutor
from curate.reports.sources import BlockSource, FrameSource, Head, SumBy

Q = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


def _frame(seed: int, n: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.normal(-0.1, 0.2, n).astype(np.float32)
    score[rng.random(n) < 0.05] = np.nan
    if seed % 2:
        score = np.round(score, 2)  # ties
    groups = np.array(["a", "b", "c", None], dtype=object)[rng.integers(0, 4, n)]
    return pl.DataFrame(
        {
            "g": pl.Series(groups.tolist(), dtype=pl.String),
            "clip_score": pl.Series(score).set(pl.Series(rng.random(n) < 0.1), None),
            "uid": [f"{i:032x}" for i in rng.permutation(n)],
        }
    )


def _blocks(df: pl.DataFrame, size: int) -> BlockSource:
    ex = LocalExecutor()
    return BlockSource(ex, [ex.submit(lambda d: d, df.slice(i, size)) for i in range(0, max(df.height, 1), size)])


@pytest.mark.parametrize("seed,n,size", [(0, 7, 3), (1, 500, 64), (2, 3000, 700), (3, 1, 1), (4, 2000, 50)])
def test_blocks_answer_as_one_frame(seed, n, size):
    df = _frame(seed, n)
    one, many = FrameSource(df), _blocks(df, size)
    for interp in ("linear", "nearest"):
        a, b = one.scores("clip_score", Q, interp), many.scores("clip_score", Q, interp)
        assert a.drop("mean").equals(b.drop("mean"))
        if a["mean"][0] is None:
            assert b["mean"][0] is None
        else:
            assert b["mean"][0] == pytest.approx(a["mean"][0], rel=1e-12)
        values = ["a", "b", None, "zz"]  # "zz" has no rows: no line for it
        a = one.scores("clip_score", Q, interp, by="g", values=values).sort("g")
        b = many.scores("clip_score", Q, interp, by="g", values=values).sort("g")
        assert a.drop("mean").equals(b.drop("mean"))
        assert np.allclose(a["mean"].to_numpy(), b["mean"].to_numpy(), rtol=1e-12, equal_nan=True)
    queries = {
        "counts": (lambda lf: lf.group_by("g").agg(pl.len().cast(pl.Int64).alias("n")), SumBy(("g",))),
        "first": (
            lambda lf: lf.filter(pl.col("clip_score") > 0).sort("clip_score", "uid").head(5),
            Head(("clip_score", "uid"), (False, False), 5),
        ),
    }
    a, b = one.collect(queries), many.collect(queries)
    assert a["counts"].sort("g").equals(b["counts"].sort("g"))
    assert a["first"].equals(b["first"])
