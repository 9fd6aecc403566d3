"""Selection steps as per-shard tasks on an executor (curate/executor.py: Ray, or in-process for
tests), reading annotation shards where they lie (run directory or bucket); the driver keeps
merged partials, never rows. The first of them: the exact top-fraction threshold.

top_fraction_threshold: DataComp's `--fraction` (the (int(N * f) + 1)-th highest score of the
scored pool) by the radix select of curate/exact_rank.py: each pass is one task per shard
returning its sparse counts, merged on the driver as they arrive (at most MERGE_EVERY results
waiting, at most `in_flight` tasks out). Same value as filters/decide.py's in-process sort, bit for
bit, with the same rows: `curate forget` keys filtered out, null and NaN scores left out.
"""

from __future__ import annotations

import numpy as np

from curate import annotations, exact_rank, faults, schema
from curate.executor import Executor, Resources
from curate.filters.decide import ResolvedSelection, scored_pool

TASK = Resources(cpus=1)
MERGE_EVERY = 64  # shard answers held before they are folded into the running sum


def score_keys(run_dir: str, shard: str) -> np.ndarray:
    """Order keys (exact_rank.order_keys) of one annotation shard's CLIP scores: the rows a
    selection sees (forgotten rows left out), null and NaN scores dropped."""
    scores = scored_pool(annotations.scan(run_dir, [shard])).collect().get_column(schema.CLIP_SCORE)
    return exact_rank.order_keys(scores.to_numpy())


def shard_score_counts(run_dir: str, shard: str, prefix: int, done: int, width: int) -> exact_rank.Counts:
    """One pass of the radix select over one shard (a task)."""
    counts = exact_rank.pass_counts(score_keys(run_dir, shard), prefix, done, width)
    faults.fire("rank_counts", shard)  # test hook (curate/faults.py): the worker dies with its answer
    return counts


def _count_pass(executor: Executor, run_dir: str, shards: list[str], in_flight: int) -> exact_rank.CountPass:
    def count(prefix: int, done: int, width: int) -> list[exact_rank.Counts]:
        todo, pending = list(reversed(shards)), set()
        acc: list[exact_rank.Counts] = []
        while todo or pending:
            while todo and len(pending) < in_flight:
                pending.add(
                    executor.submit(shard_score_counts, run_dir, todo.pop(), prefix, done, width, resources=TASK)
                )
            fut = executor.wait_first(pending)
            pending.discard(fut)
            acc.append(executor.result(fut))
            if len(acc) > MERGE_EVERY:
                acc = [exact_rank.merge(acc)]
        return [exact_rank.merge(acc)]

    return count


def top_fraction_threshold(
    run_dir: str, shards: list[str], fraction: float, executor: Executor, in_flight: int = 0
) -> ResolvedSelection:
    """The threshold `clip.top_fraction = fraction` resolves to over these annotation shards."""
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no completed annotation shards to rank")
    in_flight = in_flight or max(2, 4 * int(executor.cluster.cpus or 1))
    count = _count_pass(executor, run_dir, shards, in_flight)
    n_pool, first = exact_rank.total(count)
    if n_pool == 0:
        raise ValueError("clip.top_fraction: no row has a CLIP score; nothing to rank")
    k = exact_rank.top_fraction_index(n_pool, fraction)
    return ResolvedSelection(exact_rank.kth_largest(count, k, first), "top_fraction", n_pool)
