"""Connected components on the executor (curate/distributed_components.py) against scipy's
connected_components, each component named by its minimum node id: random sparse graphs with ids
over the whole 64-bit range, a long shuffled path, stars, cliques, duplicate / reversed / self-loop
edges, the empty graph, several input frames and 1, 2 or 7 partitions; in-process and on Ray."""

import math

import numpy as np
import polars as pl
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate import distributed_components as dc
from curate.executor import LocalExecutor

PARTITIONS = [1, 2, 7]


def frame(a, b) -> pl.DataFrame:
    return pl.DataFrame({"a": np.asarray(a, np.uint64), "b": np.asarray(b, np.uint64)})


def reference(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """(node, label) by scipy: every node of an edge, labelled with its component's minimum id."""
    e = pl.concat(frames) if frames else pl.DataFrame(schema=dc.EDGES)
    a, b = e["a"].to_numpy(), e["b"].to_numpy()
    nodes = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(ia)), (ia, ib)), shape=(len(nodes), len(nodes)))
    k, comp = connected_components(graph, directed=False)
    smallest = np.full(k, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(smallest, comp, nodes)
    return pl.DataFrame({"node": nodes, "label": smallest[comp]}, schema=dc.LABELS)


def components(ex, frames, partitions: int, **kw) -> tuple[pl.DataFrame, int]:
    """All labels, sorted by node, after checking the parts: the schema, `partitions` of them, part
    j holding only nodes of partition j."""
    futures, rounds = dc.component_labels(ex, frames, partitions, **kw)
    assert len(futures) == partitions
    parts = ex.results(futures)
    for j, part in enumerate(parts):
        assert part.schema == pl.Schema(dc.LABELS)
        assert part.select((dc.node_partition(pl.col("node"), partitions) == j).all()).item()
    return pl.concat(parts).sort("node"), rounds


def check(frames, partitions: int, ex=None) -> int:
    got, rounds = components(ex or LocalExecutor(), frames, partitions)
    want = reference(frames)
    assert got["node"].n_unique() == got.height  # each node once
    assert got.equals(want)
    return rounds


def random_graph(seed: int, nodes: int, edges: int, frames: int) -> list[pl.DataFrame]:
    """Sparse random edges on ids shard << 32 | row over the whole 64-bit range (high bit
    included), cut into `frames` frames of uneven sizes, plus a few nodes with self-loops only."""
    rng = np.random.default_rng(seed)
    ids = (rng.integers(0, 1 << 32, nodes, dtype=np.uint64) << np.uint64(32)) | rng.integers(
        0, 1 << 32, nodes, dtype=np.uint64
    )
    ids[0] |= np.uint64(1 << 63)
    a, b = rng.choice(ids, edges), rng.choice(ids, edges)
    lone = rng.choice(ids, 5)
    a, b = np.concatenate([a, lone]), np.concatenate([b, lone])
    cuts = np.sort(rng.integers(0, len(a), frames - 1))
    return [frame(x, y) for x, y in zip(np.split(a, cuts), np.split(b, cuts))]


@pytest.mark.parametrize("partitions", PARTITIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_sparse_graphs_match_scipy(seed, partitions):
    # average degree ~1.6: one big component and many small ones, trees and cycles
    frames = random_graph(seed, nodes=3000, edges=2400, frames=4)
    want = reference(frames)
    # a precondition on the generated graph, not a check of the code: several components, not all
    # singletons, so the comparison below exercises merging and separating
    assert 1 < want["label"].n_unique() < want.height
    rounds = check(frames, partitions)  # the labels equal scipy's, node for node
    assert rounds >= 1  # the input is not a star forest: at least one Large-Star/Small-Star round ran


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_a_long_path_in_shuffled_id_order(partitions):
    """Label propagation needs ~n rounds here (1,999); the star rounds take 9 on this path, and the
    bound 2 * ceil(log2 n) = 22 fails for anything like propagation (n) or sqrt(n) (45) rounds."""
    n = 2000
    ids = (np.random.default_rng(5).permutation(n).astype(np.uint64) << np.uint64(40)) | np.uint64(11)  # 64-bit ids
    path = [frame(ids[:-1], ids[1:])]
    rounds = check(path, partitions)
    assert 1 <= rounds <= 2 * math.ceil(math.log2(n))


def test_too_few_rounds_is_an_error_not_a_wrong_answer():
    ids = np.random.default_rng(6).permutation(500).astype(np.uint64)
    path = [frame(ids[:-1], ids[1:])]
    _, needed = components(LocalExecutor(), path, 2)
    with pytest.raises(RuntimeError, match="no star forest after"):
        dc.component_labels(LocalExecutor(), path, 2, max_rounds=needed - 1)
    got, rounds = components(LocalExecutor(), path, 2, max_rounds=needed)
    assert rounds == needed and got.equals(reference(path))


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_stars(partitions):
    # centre smallest (already the answer), largest, in the middle; two stars joined by a leaf edge
    leaves = np.arange(100, 160, dtype=np.uint64)
    frames = [
        frame(np.full(60, 50), leaves),
        frame(np.full(60, 1000), leaves + np.uint64(500)),
        frame(leaves + np.uint64(2000), np.full(60, 2030)),
        frame(np.full(30, 5000), np.arange(5001, 5031)),
        frame(np.full(30, 6000), np.arange(6001, 6031)),
        frame([5030], [6030]),
    ]
    check(frames, partitions)
    rounds = check(frames[:1], partitions)  # a star centred on its minimum is final at once
    assert rounds == 0


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_cliques(partitions):
    rng = np.random.default_rng(7)
    ids = rng.permutation(10_000).astype(np.uint64)[:70]
    frames = []
    for members in (ids[:30], ids[30:50], ids[50:]):
        i, j = np.triu_indices(len(members), 1)
        frames.append(frame(members[i], members[j]))
    frames.append(frame([ids[55]], [ids[69]]))  # inside the third clique: still three components
    check(frames, partitions)
    assert reference(frames)["label"].n_unique() == 3


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_duplicates_self_loops_and_both_directions(partitions):
    a = np.array([1, 2, 2, 3, 3, 3, 9, 9, 40, 41, 7, 7], np.uint64)
    b = np.array([2, 1, 1, 3, 4, 4, 9, 9, 41, 40, 7, 7], np.uint64)
    frames = [frame(a, b), frame(b, a), frame([4, 40, 1 << 63], [1, 40, 1 << 63])]
    check(frames, partitions)
    got = reference(frames)
    alone = got.filter(pl.col("node").is_in([7, 9, 1 << 63]))
    assert alone["node"].equals(alone["label"]) and alone.height == 3  # self-loops only: own components


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_the_empty_graph(partitions):
    ex = LocalExecutor()
    for frames in ([], [pl.DataFrame(schema=dc.EDGES)], [pl.DataFrame(schema=dc.EDGES)] * 3):
        got, rounds = components(ex, frames, partitions)
        assert got.height == 0 and rounds == 0


class Watching(LocalExecutor):
    """A LocalExecutor that records what the driver passes to tasks and what it fetches."""

    def __init__(self):
        super().__init__()
        self.passed, self.fetched = [], []

    def submit(self, fn, *args, **kw):
        self.passed += [type(a) for a in args]
        return super().submit(fn, *args, **kw)

    def results(self, futures):
        got = super().results(futures)
        self.fetched += got
        return got


def test_the_driver_holds_futures_and_counts_only():
    ex = Watching()
    inputs = [ex.submit(pl.DataFrame.clone, f) for f in random_graph(3, nodes=500, edges=400, frames=3)]
    ex.passed.clear()
    futures, rounds = dc.component_labels(ex, inputs, 3)
    assert rounds >= 1 and ex.fetched
    assert all(type(v) is int for v in ex.fetched)
    assert not any(issubclass(t, pl.DataFrame) for t in ex.passed)
    assert pl.concat(ex.results(futures)).sort("node").equals(reference(LocalExecutor().results(inputs)))


def test_on_ray(ray_session):
    from curate.ray_adapter import RayExecutor

    frames = random_graph(4, nodes=400, edges=330, frames=3)
    check(frames, 3, RayExecutor())
