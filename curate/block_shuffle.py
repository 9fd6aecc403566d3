"""The blocks of shards the Ray decision engine works on, and its one shuffle round (selection.engine
= "ray"): what curate/distributed_decide.py (per-row rules, exact dedups, following, clusters) and
curate/distributed_near.py (near-duplicate captions and images) are both made of.

  Plan          the run, its shards (sorted: a shard's index is its position), the blocks
                (contiguous shard ranges of about selection.block_rows rows) and the rules.
  identity      `_g` = shard index << 32 | row: a row's 64-bit name across blocks, ordered as the
                in-process engine orders rows (shards sorted, rows in order).
  by_block      a frame of identities cut into one part per block (answers sent back to blocks).
  apply_losers  a block's state after a round's losers: marked with the reason and survivor,
                no longer eligible.
  map_round /   one hash shuffle: each block sends its eligible rows' (key, survivor columns, _g)
  reduce_round  to P partitions by a hash of the key; each partition ranks its repeated keys with
                the shared survivor rule (filters/survivors.py) and sends each loser (_g, survivor
                uid, survivor _g) back to its block. A key lives in one partition, so each reducer
                sees whole duplicate groups: the union is the in-process result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate import accounting, faults
from curate.config import SelectionConfig
from curate.executor import Resources
from curate.filters.survivors import Survivor, repeated_losers

TASK = Resources(cpus=1)
G, DUP, OF, OF_G, SURVIVOR = "_g", "_dup", "_of", "_of_g", "_survivor"
KEY = "_key"
# rows of the pool per shuffle partition when selection.dedup.partitions = 0: fewer partitions
# shrink the driver's bookkeeping (blocks x partitions objects per round), more rows per partition
# grow the reducers: the near-duplicate captions' band-key reducers peaked at 1.7 GB with 1 M rows
# of the pool per partition and 2.5 GB with 1.5 M (bench_select_scale.py), so 1 M keeps a reducer
# at about a block task's peak (block_rows = 500,000: ~1.5 GB)
PARTITION_ROWS = 1_000_000


@dataclass(frozen=True)
class Plan:
    """What every task needs to know: the run, its shards (sorted; a shard's index is its
    position), the blocks (contiguous shard ranges, by their first index) and the rules."""

    run_dir: str
    shards: tuple[str, ...]
    starts: tuple[int, ...]  # first shard index of each block
    sel: SelectionConfig
    threshold: float | None
    rows: int = 0  # annotation rows of all the shards (their markers' counts)
    # selection.concepts: the prompts' embeddings and resolved thresholds (curate/concepts.py
    # ConceptSet), made once in the driver; each block scores its own shards' image embeddings
    concepts: Any = None

    @property
    def blocks(self) -> int:
        return len(self.starts)

    @property
    def partitions(self) -> int:
        """Shuffle partitions: selection.dedup.partitions, else one per PARTITION_ROWS rows of the
        pool (at least 1, at most one per block). Each round makes blocks x partitions objects, and
        the driver's Ray bookkeeping grows with them (measured: docs/SCALE.md), so they are sized
        by what a reducer can hold, not by the number of blocks."""
        if self.sel.dedup.partitions:
            return self.sel.dedup.partitions
        return max(1, min(self.blocks, -(-self.rows // PARTITION_ROWS)))

    def block_shards(self, b: int) -> list[str]:
        end = self.starts[b + 1] if b + 1 < len(self.starts) else len(self.shards)
        return list(self.shards[self.starts[b] : end])

    def block_of(self, g: pl.Series) -> np.ndarray:
        """The block holding each identity in `g`."""
        shard_idx = (g.to_numpy() >> np.uint64(32)).astype(np.int64)
        return np.searchsorted(np.asarray(self.starts), shard_idx, side="right") - 1


def plan_blocks(run_dir: str, shards: list[str], rows_per_block: int) -> tuple[int, ...]:
    """Contiguous blocks of shards of about rows_per_block rows each (the shards' markers count
    their rows); a shard bigger than that is a block of its own."""
    return blocks_of(list(accounting.shard_rows(run_dir, shards).values()), rows_per_block)


def blocks_of(shard_rows: list[int], rows_per_block: int) -> tuple[int, ...]:
    starts, acc = [0], 0
    for i, n in enumerate(shard_rows):
        if acc and acc + n > rows_per_block:
            starts.append(i)
            acc = 0
        acc += n
    return tuple(starts)


def by_block(frame: pl.DataFrame, plan: Plan, column: str = G) -> list[pl.DataFrame]:
    """`frame` cut into one part per block, by the block of its `column` identities."""
    if frame.height == 0:
        return [frame] * plan.blocks
    which = pl.Series("_b", plan.block_of(frame.get_column(column)))
    parts = {k[0]: f.drop("_b") for k, f in frame.with_columns(which).partition_by("_b", as_dict=True).items()}
    return [parts.get(b, frame.clear()) for b in range(plan.blocks)]


# --- one shuffle round --------------------------------------------------------------------------------


def apply_losers(state: pl.DataFrame, reason: str | None, parts: tuple[pl.DataFrame, ...]) -> pl.DataFrame:
    """Mark the rows that lost dedup `reason` (parts of (_g, of_uid, of_g)) and drop them from the
    eligible rows."""
    if reason is None or not parts:
        return state
    lost = pl.concat(parts)
    if lost.height == 0:
        return state
    lost = lost.select(
        G, pl.col("of_uid").alias("_new_of"), pl.col("of_g").alias("_new_of_g"), pl.lit(True).alias("_l")
    )
    return (
        state.join(lost, on=G, how="left", maintain_order="left")
        .with_columns(
            pl.when(pl.col("_l")).then(pl.lit(reason)).otherwise(pl.col(DUP)).alias(DUP),
            pl.when(pl.col("_l")).then(pl.col("_new_of")).otherwise(pl.col(OF)).alias(OF),
            pl.when(pl.col("_l")).then(pl.col("_new_of_g")).otherwise(pl.col(OF_G)).alias(OF_G),
            (pl.col("_eligible") & pl.col("_l").is_null()).alias("_eligible"),
        )
        .drop("_new_of", "_new_of_g", "_l")
    )


def map_round(
    plan: Plan, b: int, state: pl.DataFrame, prev: str | None, key_reason: str, partitions: int, *lost: pl.DataFrame
) -> list[pl.DataFrame]:
    """[state after the previous round's losers, then `partitions` parts of (key, survivor columns,
    _g): this block's eligible rows with a key, split by a hash of the key]."""
    state = apply_losers(state, prev, lost)
    survivor = Survivor.of(plan.sel.dedup)
    key = f"{KEY}{key_reason}"
    pool = state.filter(pl.col("_eligible") & pl.col(key).is_not_null()).select(
        pl.col(key).alias(KEY), *survivor.columns, G
    )
    faults.fire("decide_shuffle", f"{b}:{key_reason}")  # test hook: the worker dies mid-shuffle
    if partitions == 1:
        return [state, pool]
    part = pool.with_columns((pl.col(KEY).hash(seed=17) % partitions).alias("_p"))
    parts = {k[0]: f.drop("_p") for k, f in part.partition_by("_p", as_dict=True).items()}
    return [state, *(parts.get(j, pool.clear()) for j in range(partitions))]


def reduce_round(plan: Plan, *parts: pl.DataFrame) -> list[pl.DataFrame]:
    """One partition of the keys: the losers of its repeated keys, (_g, of_uid, of_g), one part per
    block (the losers' blocks)."""
    lost = repeated_losers(pl.concat(parts), KEY, G, Survivor.of(plan.sel.dedup)).select(
        G, "of_uid", pl.col("of_idx").alias("of_g")
    )
    return by_block(lost, plan)
