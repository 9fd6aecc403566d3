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

from typing import Any

import numpy as np
import polars as pl

from curate import annotations, concepts, distributed_decide, exact_rank, faults, schema, selection_files
from curate.block_shuffle import Plan
from curate.concepts import ConceptSet
from curate.config import SelectionConfig
from curate.executor import Executor, Resources
from curate.filters.decide import ResolvedSelection, scored_pool
from curate.reports.sources import BlockSource
from curate.reports.sweep import SCORE, at_any_threshold, scored

TASK = Resources(cpus=1)
MERGE_EVERY = 4  # shard answers held before they are folded into the running sum (each up to ~20 k bins)


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


def _count_pass(
    executor: Executor, run_dir: str, shards: list[str], in_flight: int, fn=None, *extra: Any
) -> exact_rank.CountPass:
    """One radix-select pass over the shards: fn(run_dir, shard, prefix, done, width, *extra) per
    shard (default: its CLIP scores), at most `in_flight` tasks at once, the counts merged as they
    arrive (at most MERGE_EVERY held)."""
    fn = fn or shard_score_counts

    def count(prefix: int, done: int, width: int) -> list[exact_rank.Counts]:
        todo, pending = list(reversed(shards)), set()
        acc: list[exact_rank.Counts] = []
        while todo or pending:
            while todo and len(pending) < in_flight:
                pending.add(executor.submit(fn, run_dir, todo.pop(), prefix, done, width, *extra, resources=TASK))
            fut = executor.wait_first(pending)
            pending.discard(fut)
            acc.append(executor.result(fut))
            if len(acc) > MERGE_EVERY:
                acc = [exact_rank.merge(acc)]
        return [exact_rank.merge(acc)]

    return count


def concept_thresholds_on(
    executor: Executor,
    run_dir: str,
    shards: list[str],
    sel: SelectionConfig,
    concept_set: ConceptSet,
    in_flight: int = 0,
) -> dict[str, float]:
    """concepts.resolve_thresholds on the Ray engine: a concept's top fraction by the same exact
    radix select as the CLIP score's, over its scores shard by shard (concepts.shard_score_counts),
    no score gathered in the driver (the same value, bit for bit)."""
    in_flight = in_flight or max(2, 4 * int(executor.cluster.cpus or 1))
    out: dict[str, float] = {}
    for name, rule in sel.concepts.items():
        if rule.min_similarity is not None:
            out[name] = float(rule.min_similarity)
            continue
        count = _count_pass(executor, run_dir, shards, in_flight, concepts.shard_score_counts, concept_set, name)
        n, first = exact_rank.total(count)
        if n == 0:
            raise ValueError(f"selection.concepts.{name}.top_fraction: no row has an image embedding; nothing to rank")
        out[name] = exact_rank.kth_largest(count, exact_rank.top_fraction_index(n, rule.top_fraction), first)
    return out


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


# --- a whole selection on the cluster: per-block files, counts, uid ranges ------------------------


def finish_block(
    plan: Plan,
    b: int,
    state: pl.DataFrame,
    out: str | None,
    write: str,
    report_columns: list[str],
    ranges: int,
) -> list:
    """One block's share of a selection: its shards' kept/removed/decisions files written into
    `out` (None: nothing written, as for `curate report`), then [counts (and the written files'
    digests), the columns the report reads, and the kept uids' (high, low) halves cut into `ranges`
    slices of the uid space]."""
    decided = distributed_decide.block_decisions(plan, b, state)
    shards: dict[str, dict[str, int]] = {}
    files: selection_files.Digests = {}
    if out is not None:
        for (shard,), part in decided.partition_by(schema.SHARD, as_dict=True, maintain_order=True).items():
            shards[shard], digests = selection_files.write_shard(out, shard, part, write)
            files.update(digests)
    kept = decided.filter(pl.col(schema.KEPT))
    hi, lo = selection_files.uid_halves(kept.get_column(schema.UID))
    which = selection_files.uid_range(hi, ranges)
    counts = {
        "rows": decided.height,
        "kept": kept.height,
        "not_scored": int((decided.get_column(schema.REASON) == "not_scored").sum()),
        "shards": shards,
        "files": files,
    }
    narrow = decided.select([c for c in report_columns if c in decided.columns])
    return [counts, narrow, *((hi[which == r], lo[which == r]) for r in range(ranges))]


def uid_slice(*parts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One slice of the uid space from every block, sorted as uids.npy holds it (a repeat: error)."""
    hi = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
    lo = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    return selection_files.sorted_pairs(hi, lo, unique=False)


def block_representatives(plan: Plan, b: int, state: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """One block's representatives (kept at threshold -inf, with a score): `columns` of them."""
    need = list(dict.fromkeys([*(c for c in columns if c != SCORE), schema.CLIP_SCORE]))
    return scored(distributed_decide.block_kept(plan, b, state, need)).select(columns)


def representatives_on(
    executor: Executor,
    run_dir: str,
    shards: list[str],
    sel: SelectionConfig,
    columns: list[str],
    concept_set: ConceptSet | None = None,
) -> BlockSource:
    """The sweep's representatives (curate.reports.sweep.representatives: the rows decide() keeps
    with the CLIP threshold at -inf, with a score), decided on the cluster and left there, a frame
    per block (the report asks its questions where they lie: curate/reports/sources.py).
    concept_set: the selection's concepts, embedded, with their thresholds (curate/concepts.py)."""
    loose = at_any_threshold(sel)
    plan, states = distributed_decide.decide_blocks(
        run_dir, shards, loose, float("-inf"), executor, explain=False, concept_set=concept_set
    )
    blocks = [
        executor.submit(block_representatives, plan, b, states[b], columns, resources=TASK) for b in range(plan.blocks)
    ]
    return BlockSource(executor, blocks)
