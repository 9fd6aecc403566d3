"""uids.npy streamed slice by slice (the Ray engine) is byte for byte np.save of the whole sorted
array (the local engine), and a write that fails midway leaves the old file."""

import io

import numpy as np
import pytest

from curate import selection_files as sf
from curate.selection_files import UID_DTYPE, write_uids_fetched
from curate.selection import uids_to_datacomp


def _uids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)]


@pytest.mark.parametrize("n,ranges", [(0, 1), (1, 3), (1000, 1), (1000, 7), (5000, 64)])
def test_streamed_slices_are_np_save_of_the_whole(tmp_path, n, ranges):
    uids = _uids(n)
    buf = io.BytesIO()
    np.save(buf, uids_to_datacomp(uids))
    hi, lo = sf.uid_halves(uids)
    which = sf.uid_range(hi, ranges)
    assert which.min(initial=0) >= 0 and which.max(initial=0) < ranges
    slices = [sf.sorted_pairs(hi[which == r], lo[which == r], unique=False) for r in range(ranges)]
    path = tmp_path / "uids.npy"
    sf.write_uids(str(path), n, iter(slices))
    assert path.read_bytes() == buf.getvalue()
    assert len(np.load(path)) == n


def test_a_repeated_kept_uid_is_refused():
    hi, lo = sf.uid_halves(_uids(3) * 2)
    with pytest.raises(RuntimeError, match="is repeated"):
        sf.sorted_pairs(hi, lo, unique=False)
    assert len(sf.sorted_pairs(hi, lo)) == 3


def test_a_failed_stream_leaves_the_old_file(tmp_path):
    path = tmp_path / "uids.npy"
    path.write_bytes(b"old")

    def broken():
        yield sf.sorted_pairs(*sf.uid_halves(_uids(1)))
        raise OSError("a slice could not be read")

    with pytest.raises(OSError):
        sf.write_uids(str(path), 2, broken())
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["uids.npy"]  # no temp file left
    with pytest.raises(RuntimeError, match="1 uids streamed, 2 expected"):
        sf.write_uids(str(path), 2, iter([sf.sorted_pairs(*sf.uid_halves(_uids(1)))]))
    assert path.read_bytes() == b"old"


def _echo(x):
    return x


def _ranges(n: int, parts: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    whole = np.sort(rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64).view(UID_DTYPE).ravel())
    return np.array_split(whole, parts)


@pytest.mark.parametrize("on", ["local", "ray"])
def test_a_task_streams_the_uid_ranges_it_fetches_into_np_saves_bytes(on, request, tmp_path):
    """uids.npy written by a task that is given the ranges' futures in a list and fetches them
    one at a time (Future.fetch): byte for byte np.save of the whole sorted array."""
    from curate.executor import LocalExecutor

    if on == "ray":
        request.getfixturevalue("ray_session")
        import sys

        import ray.cloudpickle  # lazy: imports ray
        from curate.ray_adapter import RayExecutor  # lazy: imports ray

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _echo: workers cannot import tests/
        ex = RayExecutor()
    else:
        ex = LocalExecutor()
    ranges = _ranges(5000, 4, seed=1)
    futures = [ex.submit(_echo, r) for r in ranges]
    path = tmp_path / "uids.npy"
    digest = ex.result(ex.submit(write_uids_fetched, str(path), 5000, futures))
    expect = tmp_path / "expect.npy"
    np.save(expect, np.concatenate(ranges))
    assert path.read_bytes() == expect.read_bytes()
    assert digest["bytes"] == path.stat().st_size
    with pytest.raises(RuntimeError, match="4999 expected"):  # a count that does not add up: no file
        ex.result(ex.submit(write_uids_fetched, str(tmp_path / "bad.npy"), 4999, futures))
    assert not (tmp_path / "bad.npy").exists()
