"""decide() on the cluster (selection.engine = "ray"): the same decisions as filters/decide.py,
computed by tasks over blocks of annotation shards, with no row passing through the driver for the
per-row rules and the exact dedups. The driver holds the plan (shard names, block bounds) and
futures; rows live in the object store (spilled to disk by Ray when it fills).

Steps (each a wave of tasks on the executor: Ray, or in-process for tests):
  start     per block: read its annotation shards (forgotten rows left out), evaluate every per-row
            rule (filters/rules.py), keep a small state per row: identity `_g` = shard index << 32 |
            row, the failure flags, `_eligible`, the survivor columns and the dedup keys.
  exact dedup, one round per rule in registry order (URL, image sha256, caption text, uid):
            map: each block applies the previous round's losers to its state and sends its eligible
            rows' (key, survivor columns, _g) to P partitions by a hash of the key; reduce: each
            partition ranks the keys that repeat with the shared survivor rule (filters/survivors.py)
            and sends each loser (_g, survivor uid, survivor _g) back to its block. A key lives in one
            partition, so each reducer sees whole duplicate groups: the union is the in-process result.
  near dedup (captions, images; off by default): candidate pairs, verification, k-means and the
            in-cluster comparisons as tasks, components by Large-Star / Small-Star rounds, then the
            component label is the key of one more exact round (curate/distributed_near.py).
  follow    a duplicate whose survivor lost a later dedup points at that survivor's survivor
            (decide()'s _follow_survivor): rounds of ask (loser -> its survivor's block) and answer
            (-> the loser's block), at most one round per dedup step that follows.
  cluster   each row that some duplicate names is told so (shuffle by the survivor's block): its
            duplicate_cluster is its own uid.
  finish    per block: the annotation rows with kept, reason, reasons, duplicate_of and
            duplicate_cluster (filters/decide.py's explained(), one definition for both engines).

Why Ray core tasks rather than Ray Data's groupby: the step must reproduce the in-process engine
bit for bit (a total survivor order over four columns, eligibility that changes between rounds, a
pointer-following phase), the executor interface lets the whole engine run in-process in tests, and
each shuffle moves only the eligible rows' key and survivor columns. docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from curate import accounting, annotations, concepts, schema
from curate.block_shuffle import (
    DUP,
    G,
    KEY,
    OF,
    OF_G,
    SURVIVOR,
    TASK,
    Plan,
    apply_losers,
    by_block,
    blocks_of,
    map_round,
    reduce_round,
)
from curate.config import SelectionConfig
from curate.distributed_near import near_round
from curate.executor import Executor
from curate.filters.decide import (
    dedup_steps,
    explained,
    fail_column,
    nan_free_scores,
    caption_ngram_sizes,
    check_caption_ngram,
)
from curate.filters.rules import (
    BY_REASON,
    DEDUP_RULES,
    Reason,
    check_rule_columns,
    reason_order,
    row_reasons,
    rule_failures,
)
from curate.filters.survivors import Survivor


# --- start ----------------------------------------------------------------------------------------


def _identity(plan: Plan, b: int) -> pl.Expr:
    shards = plan.block_shards(b)
    index = (
        pl.col(schema.SHARD)
        .cast(pl.String)
        .replace_strict(shards, list(range(plan.starts[b], plan.starts[b] + len(shards))), return_dtype=pl.UInt64)
    )
    return (index * (1 << 32) + pl.col(schema.ROW).cast(pl.UInt64)).alias(G)


def _block_frame(plan: Plan, b: int) -> pl.LazyFrame:
    """The block's annotation rows as decide() reads them (NaN scores are no score), with each
    concept's score from the block's own image embeddings (the prompts embedded once, in the plan)."""
    shards = plan.block_shards(b)
    return concepts.with_scores(
        nan_free_scores(annotations.scan(plan.run_dir, shards)), plan.run_dir, shards, plan.concepts
    )


def start_block(plan: Plan, b: int) -> tuple[pl.DataFrame, list[int]]:
    """(state, caption_lsh_ngram values seen): the per-row rules of one block, as failure flags."""
    sel = plan.sel
    survivor = Survivor.of(sel.dedup)
    fails = rule_failures(sel, plan.threshold, dict(plan.concepts.thresholds) if plan.concepts else None)
    lf = _block_frame(plan, b)
    names = lf.collect_schema().names()
    steps = dedup_steps(sel)
    near = {r for r, key in steps if key is None}
    carry = list(survivor.columns)
    if Reason.DUPLICATE_CAPTION in near:
        carry += [c for c in (schema.CAPTION_LSH, schema.CAPTION) if c in names]
    keys = [key.alias(f"{KEY}{r.value}") for r, key in steps if key is not None]
    state = (
        lf.with_columns(_identity(plan, b), *[expr.alias(fail_column(r)) for r, expr in fails.items()])
        .with_columns(pl.any_horizontal([pl.col(fail_column(r)) for r in fails]).not_().alias("_eligible"))
        .select(
            G,
            *dict.fromkeys(carry),
            *keys,
            *[fail_column(r) for r in fails],
            "_eligible",
            pl.lit(None, pl.String).alias(DUP),
            pl.lit(None, pl.String).alias(OF),
            pl.lit(None, pl.UInt64).alias(OF_G),
        )
        .collect()
    )
    ngrams = []
    if Reason.DUPLICATE_CAPTION in near:
        ngrams = caption_ngram_sizes(lf)
    return state, ngrams


# --- follow and cluster -----------------------------------------------------------------------------


def settle(state: pl.DataFrame, prev: str | None, *lost: pl.DataFrame) -> pl.DataFrame:
    """The state after the last dedup round's losers."""
    return apply_losers(state, prev, lost)


def ask(plan: Plan, state: pl.DataFrame, follows: tuple[str, ...]) -> list[pl.DataFrame]:
    """Per block, the questions (asker _g, target _g) of this block's duplicates whose rule
    follows, sent to their survivors' blocks."""
    q = state.filter(pl.col(DUP).is_in(follows)).select(pl.col(G).alias("_asker"), pl.col(OF_G).alias(G))
    return by_block(q, plan)


def answer(plan: Plan, state: pl.DataFrame, follows: tuple[str, ...], *questions: pl.DataFrame) -> list:
    """Per block, the answers (asker _g, new of_uid, new of_g) to questions about this block's rows
    that lost a dedup step that follows."""
    q = pl.concat(questions)
    moved = state.filter(pl.col(DUP).is_in(follows)).select(G, pl.col(OF).alias("of_uid"), pl.col(OF_G).alias("of_g"))
    a = q.join(moved, on=G, how="inner").select(pl.col("_asker").alias(G), "of_uid", "of_g")
    return by_block(a, plan)


def apply_answers(state: pl.DataFrame, *answers: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    a = pl.concat(answers)
    if a.height == 0:
        return state, 0
    a = a.select(G, pl.col("of_uid").alias("_new_of"), pl.col("of_g").alias("_new_of_g"))
    state = (
        state.join(a, on=G, how="left", maintain_order="left")
        .with_columns(pl.coalesce("_new_of", OF).alias(OF), pl.coalesce("_new_of_g", OF_G).alias(OF_G))
        .drop("_new_of", "_new_of_g")
    )
    return state, a.height


def targets(plan: Plan, state: pl.DataFrame) -> list[pl.DataFrame]:
    """Per block, the identities this block's duplicates name (their survivors)."""
    return by_block(state.filter(pl.col(OF_G).is_not_null()).select(pl.col(OF_G).alias(G)).unique(), plan)


def mark_survivors(state: pl.DataFrame, *named: pl.DataFrame) -> pl.DataFrame:
    named_g = pl.concat(named).unique().with_columns(pl.lit(True).alias(SURVIVOR))
    return state.join(named_g, on=G, how="left", maintain_order="left").with_columns(pl.col(SURVIVOR).fill_null(False))


# --- finish -------------------------------------------------------------------------------------------


def block_decisions(plan: Plan, b: int, state: pl.DataFrame) -> pl.DataFrame:
    """The block's annotation rows with decide()'s decision columns, in the annotations' order."""
    flags = [fail_column(r) for r in row_reasons(plan.sel)]
    dedup = [(pl.col(DUP) == r.reason).fill_null(False).alias(fail_column(Reason(r.reason))) for r in DEDUP_RULES]
    decided = state.select(G, *flags, *dedup, OF, SURVIVOR)
    frame = _block_rows(plan, b).join(decided, on=G, how="left", maintain_order="left").drop(G)
    return explained(frame.lazy(), reason_order(plan.sel)).collect()


def block_kept(plan: Plan, b: int, state: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """`columns` of the block's kept rows (explain=False: the rows still eligible), in the
    annotations' order."""
    kept = state.filter(pl.col("_eligible")).select(G)
    rows = _block_rows(plan, b, columns)
    return rows.join(kept, on=G, how="semi", maintain_order="left").select(columns)


def _block_rows(plan: Plan, b: int, columns: list[str] | None = None) -> pl.DataFrame:
    """The block's annotation rows (only `columns`, when given) with their identity, to join a
    state's columns back to."""
    lf = _block_frame(plan, b)
    if columns is not None:
        lf = lf.select(list(dict.fromkeys([schema.SHARD, schema.ROW, *columns])))
    return lf.with_columns(_identity(plan, b)).collect()


# --- the driver -----------------------------------------------------------------------------------------


def decide_blocks(
    run_dir: str,
    shards: list[str],
    sel: SelectionConfig,
    threshold: float | None,
    executor: Executor,
    rows_per_block: int | None = None,
    explain: bool = True,
    concept_set: concepts.ConceptSet | None = None,
) -> tuple[Plan, list[Any]]:
    """(plan, one future per block of its final state): run every wave up to the finish. The
    caller turns each state into what it needs (block_decisions, written files, counts). Blocks
    of about selection.block_rows rows unless rows_per_block is given.
    explain=False: only which rows are kept (`_eligible`), as decide(explain=False): no following,
    no clusters."""
    rows_per_block = rows_per_block or sel.block_rows
    if shards:  # a column the spec names for a rule (clip.by) that the annotations lack: said here, not in a task
        check_rule_columns(sel, annotations.scan(run_dir, shards[:1]).collect_schema())
    counts = list(accounting.shard_rows(run_dir, shards).values())
    if sel.concepts and (concept_set is None or not concept_set.thresholds):
        raise ValueError("selection.concepts: decide_blocks needs the concepts embedded with their thresholds resolved")
    plan = Plan(run_dir, tuple(shards), blocks_of(counts, rows_per_block), sel, threshold, sum(counts), concept_set)
    B = plan.blocks
    P = plan.partitions
    started = [executor.submit(start_block, plan, b, resources=TASK, num_returns=2) for b in range(B)]
    states = [s[0] for s in started]
    prev: str | None = None
    lost: list[list[Any]] = [[] for _ in range(B)]  # the previous round's losers, per block
    steps = dedup_steps(sel)
    for reason, key in steps:
        if key is not None:
            outs = [
                executor.submit(
                    map_round, plan, b, states[b], prev, reason.value, P, *lost[b], resources=TASK, num_returns=1 + P
                )
                for b in range(B)
            ]
            states = [o[0] for o in outs]
            reduced = [
                executor.submit(reduce_round, plan, *[o[1 + j] for o in outs], resources=TASK, num_returns=B)
                for j in range(P)
            ]
            lost = [[r[b] for r in reduced] for b in range(B)]
        else:
            ngram = None
            if reason == Reason.DUPLICATE_CAPTION:
                ngram = check_caption_ngram(set().union(*executor.results([s[1] for s in started])))
            states, lost = near_round(executor, plan, reason, states, prev, lost, ngram)
        prev = reason.value
    states = [
        executor.submit(settle, states[b], prev, *lost[b], resources=TASK) if lost[b] else states[b] for b in range(B)
    ]
    if not explain:
        return plan, states
    # a duplicate whose survivor lost a later step that follows: one hop per round, at most one
    # hop fewer than there are such steps (each hop goes to a later step)
    follows = tuple(r.value for r, _ in steps if BY_REASON[r].follow)
    for _ in range(len(follows) - 1):
        asked = [executor.submit(ask, plan, states[b], follows, resources=TASK, num_returns=B) for b in range(B)]
        answered = [
            executor.submit(answer, plan, states[b], follows, *[a[b] for a in asked], resources=TASK, num_returns=B)
            for b in range(B)
        ]
        applied = [
            executor.submit(apply_answers, states[b], *[a[b] for a in answered], resources=TASK, num_returns=2)
            for b in range(B)
        ]
        states = [a[0] for a in applied]
        if sum(executor.results([a[1] for a in applied])) == 0:
            break
    named = [executor.submit(targets, plan, states[b], resources=TASK, num_returns=B) for b in range(B)]
    states = [executor.submit(mark_survivors, states[b], *[n[b] for n in named], resources=TASK) for b in range(B)]
    return plan, states


def decide_on_ray(
    run_dir: str,
    shards: list[str],
    sel: SelectionConfig,
    threshold: float | None,
    executor: Executor,
    rows_per_block: int | None = None,
    concept_set: concepts.ConceptSet | None = None,
) -> pl.DataFrame:
    """Every block's decisions gathered into one frame: for tests and small runs (the writers of
    curate/selection.py consume blocks where they are)."""
    plan, states = decide_blocks(run_dir, shards, sel, threshold, executor, rows_per_block, concept_set=concept_set)
    futures = [executor.submit(block_decisions, plan, b, states[b], resources=TASK) for b in range(plan.blocks)]
    return pl.concat(executor.results(futures))
