"""Connected components of a large undirected graph, computed by tasks on an executor (Ray, or
in-process for tests), with no edge or node ever passing through the driver: it holds futures and
one small count per task and round.

Algorithm: Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce
and Beyond" (SoCC 2014): alternate two rounds, each a group-by on a node u, that keep every
component connected while moving its edges towards its minimum node id:
  Large-Star  on u with neighbourhood N(u): m = min(N(u) ∪ {u}); emit (v, m) for every v in N(u)
              with v > u (u's larger neighbours hang off the smallest node u knows).
  Small-Star  on u with N'(u) = the neighbours <= u: m = min(N'(u) ∪ {u}); emit (v, m) for every
              v in N'(u) ∪ {u}, v != m.
Their fixed point is a forest of stars, each centred on its component's minimum node id; the
alternation reaches it in O(log^2 n) rounds (n nodes; the paper's bound; in practice far fewer).

Node ids are UInt64. An edge frame has columns `a`, `b`; input frames may hold duplicates,
self-loops and both directions. A node with only self-loops is its own component: the rounds
carry it along as the edge (u, u).

Fused shuffle: each round is a hash shuffle by node (`node_partition`: a hash of the node, modulo
P), reducer j concatenating its part j of every previous output (`num_returns=P`, so it fetches
nothing else) and grouping on the node; every reducer emits its edges already split for the next
step, so there is no separate map wave:
  map         input frame -> both directions, split by `a` (Large-Star groups on every endpoint).
  Large-Star  groups on `a` (full neighbourhoods); emits (v, m), m < v, split by `a` = v: the
              larger endpoint of an edge, the node Small-Star groups it on.
  Small-Star  groups on `a` (here its neighbours are exactly the ones <= a); emits its edges in
              both directions, split by `a` for the next Large-Star.
Each reducer deduplicates its edges. A reducer holds the edges of the nodes hashed to it: about
edges / P, except that a node's whole neighbourhood lies in one task, and once the stars form a
component's centre neighbours its whole component (a giant component lands in one task).

Termination: the Large-Star reducer sees full neighbourhoods, so it also counts the nodes that
break "star centred on its minimum": a node with more than one smaller neighbour, or with both a
smaller and a larger one. Only these counts reach the driver. When their sum is 0 the input of
that Large-Star round already is the star forest: one last wave labels each node with the minimum
of itself and its neighbours (a leaf's centre, or itself). `max_rounds` bounds the loop
(RuntimeError past it).
"""

from __future__ import annotations

import polars as pl

from curate.executor import Executor, Future, Resources

TASK = Resources(cpus=1)
MAX_ROUNDS = 200
SEED = 0x5EED  # the hash that places a node in a partition, the same in every task
EDGES = {"a": pl.UInt64, "b": pl.UInt64}
LABELS = {"node": pl.UInt64, "label": pl.UInt64}

A, B = pl.col("a"), pl.col("b")


def node_partition(node: pl.Expr, partitions: int) -> pl.Expr:
    """The partition of each node (the `label` parts of `component_labels` are split by this)."""
    return node.hash(seed=SEED) % partitions


def _split(edges: pl.DataFrame, partitions: int) -> list[pl.DataFrame]:
    """`edges` cut into `partitions` parts by the partition of `a`."""
    if partitions == 1:
        return [edges]
    keyed = edges.with_columns(node_partition(A, partitions).alias("_p"))
    parts = {k[0]: f.drop("_p") for k, f in keyed.partition_by("_p", as_dict=True).items()}
    return [parts.get(j, edges.clear()) for j in range(partitions)]


def _concat(parts: tuple[pl.DataFrame, ...]) -> pl.DataFrame:
    return pl.concat(parts) if parts else pl.DataFrame(schema=EDGES)


def map_edges(edges: pl.DataFrame, partitions: int) -> list[pl.DataFrame]:
    """An input frame in both directions, deduplicated, split for the first Large-Star."""
    e = edges.select(A.cast(pl.UInt64), B.cast(pl.UInt64))
    if e.null_count().sum_horizontal().item():
        raise ValueError("component_labels: an edge has a null node")
    return _split(pl.concat([e, e.select(a=B, b=A)]).unique(), partitions)


def large_star(partitions: int, *parts: pl.DataFrame) -> list:
    """[P parts of the Large-Star edges, split for Small-Star; the number of nodes here that are
    neither a star centre nor a leaf of one]."""
    e = _concat(parts).unique().with_columns(pl.min_horizontal(A, B.min().over("a")).alias("m"))
    nodes = e.group_by("a").agg((B < A).sum().alias("lo"), (B > A).sum().alias("hi"))
    lo, hi = pl.col("lo"), pl.col("hi")
    bad = nodes.filter((lo > 1) | ((lo > 0) & (hi > 0))).height
    alone = nodes.filter((lo == 0) & (hi == 0)).select("a", b=A)  # self-loops only
    out = pl.concat([e.filter(B > A).select(a=B, b=pl.col("m")), alone])
    return [*_split(out, partitions), bad]


def small_star(partitions: int, *parts: pl.DataFrame) -> list[pl.DataFrame]:
    """P parts of the Small-Star edges in both directions, split for Large-Star. Every input edge
    has b <= a (Large-Star's output), so the group on `a` is N'(a)."""
    e = _concat(parts).unique().with_columns(B.min().over("a").alias("m"))
    m = pl.col("m")
    tied = pl.concat([e.select(x=B, m=m), e.select(x=A, m=m)]).filter(pl.col("x") != m).unique()
    alone = e.filter(m == A).select("a", "b")  # min(N'(a) ∪ {a}) = a: only the self-loop (a, a)
    out = pl.concat([tied.select(a="x", b="m"), tied.select(a="m", b="x"), alone.unique()])
    return _split(out, partitions)


def labels(*parts: pl.DataFrame) -> pl.DataFrame:
    """(node, label) of a star forest's nodes: the minimum of the node and its neighbours."""
    e = _concat(parts)
    return (
        e.group_by("a")
        .agg(B.min())
        .select(pl.col("a").alias("node"), pl.min_horizontal(A, B).alias("label"))
        .cast(LABELS)
    )


def component_labels(
    executor: Executor,
    edges: list,
    partitions: int,
    resources: Resources = TASK,
    max_rounds: int = MAX_ROUNDS,
) -> tuple[list[Future], int]:
    """(parts, rounds): `partitions` futures of (node UInt64, label UInt64) frames, part j holding
    the nodes with node_partition == j, each node of any edge of `edges` (futures or frames with
    UInt64 columns a, b) once, labelled with the minimum node id of its component; and the number
    of Large-Star + Small-Star rounds it took (0: the input already was a star forest)."""
    if partitions < 1:
        raise ValueError(f"component_labels: partitions must be >= 1, not {partitions}")
    p = partitions
    outs = [executor.submit(map_edges, e, p, resources=resources, num_returns=p) for e in edges]
    for rounds in range(max_rounds + 1):
        stars = [
            executor.submit(large_star, p, *[o[j] for o in outs], resources=resources, num_returns=p + 1)
            for j in range(p)
        ]
        if sum(executor.results([s[p] for s in stars])) == 0:
            parts = [executor.submit(labels, *[o[j] for o in outs], resources=resources) for j in range(p)]
            return parts, rounds
        if rounds == max_rounds:
            break
        outs = [
            executor.submit(small_star, p, *[s[j] for s in stars], resources=resources, num_returns=p) for j in range(p)
        ]
    raise RuntimeError(
        f"component_labels: no star forest after {max_rounds} Large-Star/Small-Star rounds "
        f"(O(log^2 n) are enough for n nodes; max_rounds too small?)"
    )
