"""The exact top-fraction threshold without gathering the scores (curate/exact_rank.py, a radix
select over order keys; curate/distributed_selection.py, one task per annotation shard per pass):
the same value as sorting everything, on awkward values and on annotation shards, in-process and
on Ray, with forgotten rows left out exactly as the in-process engine leaves them out."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate import annotations, deletions, exact_rank, io, schema
from curate.config import SelectionConfig
from curate.distributed_selection import top_fraction_threshold
from curate.executor import LocalExecutor
from curate.filters.decide import resolve_clip_threshold


def _values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "clip":  # float32 cosines, as curate stores them
        return rng.normal(0.28, 0.04, n).astype(np.float32).astype(np.float64)
    if kind == "ties":  # few distinct values, both zeros, tiny and negative ones
        return rng.choice([0.3, 0.1, 0.0, -0.0, -1.5, 5e-324, -5e-324, 1e300], n)
    if kind == "equal":
        return np.full(n, 0.25)
    return rng.normal(0, 1, n) * rng.choice([1.0, 1e-200, 1e200], n)  # "wide": every exponent range


@pytest.mark.parametrize("kind", ["clip", "ties", "equal", "wide"])
def test_kth_largest_is_the_sorted_value(kind):
    rng = np.random.default_rng(len(kind))
    for _ in range(25):
        v = _values(kind, int(rng.integers(1, 2000)), rng)
        keys = [exact_rank.order_keys(s) for s in np.array_split(v, int(rng.integers(1, 6)))]

        def count(prefix, done, width, keys=keys):
            return [exact_rank.pass_counts(k, prefix, done, width) for k in keys]

        n, first = exact_rank.total(count)
        assert n == len(v)
        desc = np.sort(v)[::-1]
        for k in {0, len(v) - 1, int(rng.integers(0, len(v)))}:
            got = exact_rank.kth_largest(count, k, first)
            assert got == desc[k] and np.signbit(got) == (desc[k] < 0), (kind, k)


def test_order_keys_sort_like_the_floats_and_refuse_nan():
    v = np.array([-np.inf, -1e300, -1.0, -5e-324, -0.0, 0.0, 5e-324, 0.28, 1.0, np.inf])
    keys = exact_rank.order_keys(v)
    assert (np.diff(keys.astype(object)) >= 0).all() and keys[4] == keys[5]  # -0.0 counts as +0.0
    assert [exact_rank.key_value(int(k)) for k in keys] == [x + 0.0 for x in v]
    with pytest.raises(ValueError, match="NaN"):
        exact_rank.order_keys(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="beyond"):
        exact_rank.kth_largest(lambda p, d, w: [exact_rank.pass_counts(keys, p, d, w)], len(v))


def _annotation_shards(run_dir: str, rng: np.random.Generator) -> list[str]:
    """Five annotation shards with float32 scores, ties, nulls and NaN, one of them empty."""
    names = []
    for s, n in enumerate([400, 0, 350, 1, 500]):
        name = f"part-{s:05d}"
        scores = rng.normal(0.28, 0.05, n).astype(np.float32)
        scores[rng.random(n) < 0.1] = 0.3  # ties at a plausible threshold
        mask = rng.random(n) < 0.05
        scores[rng.random(n) < 0.03] = np.nan
        table = pa.table(
            {
                schema.SHARD: [name] * n,
                schema.ROW: pa.array(range(n), pa.int64()),
                schema.UID: [f"{s:08x}{i:024x}" for i in range(n)],
                schema.CLIP_SCORE: pa.array(scores, pa.float32(), mask=mask),
            }
        )
        io.write_parquet(annotations.shard_path(run_dir, name), annotations.conform(table))
        names.append(name)
    return names


def _in_process(run_dir: str, shards: list[str], fraction: float) -> float:
    sel = SelectionConfig(clip={"top_fraction": fraction})
    return resolve_clip_threshold(annotations.scan(run_dir, shards), sel).clip_threshold


def test_threshold_over_annotation_shards_matches_the_in_process_engine(tmp_path):
    run_dir = str(tmp_path)
    shards = _annotation_shards(run_dir, np.random.default_rng(7))
    ex = LocalExecutor()
    for fraction in (0.001, 0.1, 0.25, 0.5, 0.9, 1.0):
        got = top_fraction_threshold(run_dir, shards, fraction, ex, in_flight=2)
        assert got.clip_threshold == _in_process(run_dir, shards, fraction), fraction
        assert got.clip_rule == "top_fraction"
    scored = annotations.scan(run_dir, shards).select(pl.col(schema.CLIP_SCORE).is_not_nan().sum()).collect().item()
    assert got.scored_pool == scored  # nulls and NaN are not in the pool

    # forgotten rows are not ranked: forget every score above the current 10% threshold
    top = top_fraction_threshold(run_dir, shards, 0.1, ex).clip_threshold
    uids = annotations.scan(run_dir, shards).filter(pl.col(schema.CLIP_SCORE) >= top).collect()[schema.UID]
    deletions.add_keys(run_dir, deletions.keys_for("uids", uids.to_list()))
    after = top_fraction_threshold(run_dir, shards, 0.1, ex).clip_threshold
    assert after == _in_process(run_dir, shards, 0.1) and after < top


def test_threshold_on_ray_is_the_same(tmp_path, ray_session):
    from curate.config import RayConfig
    from curate.ray_adapter import RayExecutor

    run_dir = str(tmp_path)
    shards = _annotation_shards(run_dir, np.random.default_rng(11))
    ex = RayExecutor(RayConfig())
    for fraction in (0.05, 0.3):
        got = top_fraction_threshold(run_dir, shards, fraction, ex, in_flight=2)
        assert got.clip_threshold == _in_process(run_dir, shards, fraction)


def test_a_pool_without_scores_is_refused(tmp_path):
    run_dir = str(tmp_path)
    table = pa.table({schema.SHARD: ["s"], schema.ROW: pa.array([0], pa.int64()), schema.UID: ["0" * 32]})
    io.write_parquet(annotations.shard_path(run_dir, "s"), annotations.conform(table))
    with pytest.raises(ValueError, match="no row has a CLIP score"):
        top_fraction_threshold(run_dir, ["s"], 0.5, LocalExecutor())
