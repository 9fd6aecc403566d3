"""Selection: annotations in, one decision per row out.

decide() adds `kept`, `reason` (first failing rule in RULE_ORDER), `reasons` (all failing rules)
and `duplicate_of` to every annotation row. It reads annotations only: no model, no network.
With concepts (selection.concepts), the caller joins each concept's score column first
(curate/concepts.py with_scores): a rule family whose reasons are concept:<name>, in the order
at the family's place (filters/rules.py reason_order).

Dedup runs last and only among rows that pass every other rule, so a copy that would be removed
anyway never wins. The survivor of a duplicate group is deterministic, by dedup.survivor
(filters/survivors.py): by default the highest CLIP score (rows without a score rank last), then
the smallest uid, then the smallest (shard, row); or keep-first in input order; or the highest
value of a priority column. Changing the CLIP threshold re-picks survivors without recomputing.
The last dedup is by uid (duplicate_uid, always on): kept uids are unique, one uids.npy entry each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import polars as pl

from curate import concepts, schema
from curate.config import SelectionConfig
from curate.exact_rank import top_fraction_index
from curate.filters.rules import (
    DEDUP_RULES,
    Reason,
    check_rule_columns,
    family_inputs,
    reason_order,
    rule_failures,
    rule_inputs,
)
from curate.stages.caption_minhash import DEFAULT_NGRAM
from curate.filters.survivors import BEST_SCORE, Survivor, duplicates_frame, repeated_losers
from curate.filters.image_dedup import check_hashes, image_duplicates
from curate.filters.caption_dedup import caption_duplicates

IDX = _IDX = "_i"  # a row index for the joins inside decide(): cheaper than joining on (shard, row)


@dataclass(frozen=True)
class ResolvedSelection:
    """What a selection actually applied, e.g. the score threshold a top_fraction turned into."""

    clip_threshold: float | None
    clip_rule: str  # "off", "min_score", "top_fraction"
    scored_pool: int | None  # rows with a score, for top_fraction
    # each concept's score threshold (min_similarity, or what a top_fraction resolved to); None: not
    # resolved yet (decide() resolves it over the annotations' concept columns)
    concepts: dict[str, float] | None = None

    def as_dict(self) -> dict:
        out = {"clip_threshold": self.clip_threshold, "clip_rule": self.clip_rule, "scored_pool": self.scored_pool}
        if self.concepts:
            out["concept_thresholds"] = dict(self.concepts)
        return out


AUTO_RAY_ROWS = (
    20_000_000  # selection.engine = "auto": Ray above this (~30 GiB in one process at ~1.5 KB a row, docs/SCALE.md)
)


def on_ray(sel: SelectionConfig, annotations: pl.LazyFrame) -> bool:
    """Whether selection.engine sends the distributed steps to Ray: "ray", or "auto" with more than
    AUTO_RAY_ROWS rows or inside a Ray job (RAY_ADDRESS set, as on a cluster)."""
    if sel.engine != "auto":
        return sel.engine == "ray"
    if os.environ.get("RAY_ADDRESS"):
        return True
    return annotations.select(pl.len()).collect().item() > AUTO_RAY_ROWS


def decide_inputs(sel: SelectionConfig) -> set[str]:
    """The annotation columns decide() reads for this selection: every rule's inputs (the registry)
    and the survivor rule's columns, without the caption band keys unless caption near-dedup is on
    (they are the widest column). What a caller may project the annotations to before decide()."""
    cols = {*rule_inputs(sel), *family_inputs(sel), *Survivor.of(sel.dedup).columns}
    if sel.dedup.caption_jaccard is None:
        cols -= {schema.CAPTION_LSH, schema.CAPTION_LSH_NGRAM}
    return cols


def scored_pool(annotations: pl.LazyFrame) -> pl.LazyFrame:
    """The scores a top fraction ranks: clip_score as float64, null and NaN ("no score") left out.
    One definition for the in-process sort and the per-shard ranking (curate/distributed_selection.py)."""
    return (
        annotations.select(pl.col(schema.CLIP_SCORE).cast(pl.Float64))
        .drop_nulls()
        .filter(pl.col(schema.CLIP_SCORE).is_nan().not_())
    )


def resolve_clip_threshold(annotations: pl.LazyFrame, sel: SelectionConfig) -> ResolvedSelection:
    if sel.clip.min_score is not None:
        return ResolvedSelection(sel.clip.min_score, "min_score", None)
    if sel.clip.top_fraction is None:
        return ResolvedSelection(None, "off", None)
    # Exactly DataComp's --fraction: n = int(N * fraction); threshold = the (n+1)-th highest score
    # over the whole scored pool; keep score >= threshold.
    scores = scored_pool(annotations).collect().get_column(schema.CLIP_SCORE).sort(descending=True)
    n_pool = scores.len()
    if n_pool == 0:
        raise ValueError("clip.top_fraction: no row has a CLIP score; nothing to rank")
    n = top_fraction_index(n_pool, sel.clip.top_fraction)
    return ResolvedSelection(float(scores[n]), "top_fraction", n_pool)


def _fail(reason: Reason | str) -> str:
    """The failure flag column of a rule, by its reason (a Reason, or a reason string such as concept:<name>)."""
    return f"_fails_{reason.value if isinstance(reason, Reason) else reason}"


fail_column = _fail  # the failure flag of a rule, as both engines name it (curate/distributed_decide.py)


def nan_free_scores(annotations: pl.LazyFrame) -> pl.LazyFrame:
    """NaN is "no score", never a score that passes or fails: normalised before any rule reads it."""
    return annotations.with_columns(pl.col(schema.CLIP_SCORE).fill_nan(None))


def _of(reason: Reason) -> str:
    return f"_{reason.value}_of"


def _dedup(
    frame: pl.LazyFrame, key: str, eligible: str, reason: Reason, survivor: Survivor = BEST_SCORE
) -> pl.LazyFrame:
    """Mark rows that duplicate an eligible survivor on `key` (see curate.filters.survivors)."""
    pool = frame.filter(pl.col(eligible) & pl.col(key).is_not_null())
    return _mark(frame, repeated_losers(pool, key, _IDX, survivor), reason)


def _mark(frame: pl.LazyFrame, dups: pl.LazyFrame | pl.DataFrame, reason: Reason) -> pl.LazyFrame:
    """Join a dedup step's losers (idx, of_uid, of_idx) back as the reason's failure flag, the
    survivor's uid and the survivor's row index."""
    fail_col, of_col = _fail(reason), _of(reason)
    dups = dups.lazy().select(
        pl.col(_IDX),
        pl.lit(True).alias(fail_col),
        pl.col("of_uid").alias(of_col),
        pl.col("of_idx").alias(f"{of_col}_idx"),
    )
    # materialised: every dedup step reads the frame twice (its pool, and this join back), so a
    # lazy frame would double the plan at each of the five steps (32 copies of the rules; the
    # streaming engine took 35 s for 600 rows). The local engine holds the frame anyway.
    return frame.join(dups, on=_IDX, how="left").with_columns(pl.col(fail_col).fill_null(False)).collect().lazy()


def _follow_survivor(frame: pl.LazyFrame, earlier: Reason, later: Reason) -> pl.LazyFrame:
    """An `earlier` duplicate's survivor may itself lose the `later` dedup; point the earlier
    duplicate at the final survivor then, so duplicate_of always names a kept row."""
    e_of, l_of = _of(earlier), _of(later)
    losers = frame.filter(pl.col(_fail(later))).select(
        pl.col(_IDX).alias(f"{e_of}_idx"), pl.col(l_of).alias("_final_of"), pl.col(f"{l_of}_idx").alias("_final_idx")
    )
    return (
        frame.join(losers, on=f"{e_of}_idx", how="left")
        .with_columns(
            pl.coalesce("_final_of", e_of).alias(e_of),
            pl.coalesce("_final_idx", f"{e_of}_idx").alias(f"{e_of}_idx"),
        )
        .drop("_final_of", "_final_idx")
    )


def _caption_dedup(frame: pl.LazyFrame, sel: SelectionConfig, has_lsh: bool, ngram: int | None = None) -> pl.LazyFrame:
    """Near-duplicate captions among eligible rows (filters/caption_dedup.py). The global step is
    eager: it collects the eligible rows' band keys, clusters them, and joins the result back.
    ngram: the shingle size (check_caption_ngram over every row); None reads it from `frame`."""
    if has_lsh:
        pool = (
            frame.filter(pl.col("_eligible") & pl.col(schema.CAPTION_LSH).is_not_null())
            .select(*dict.fromkeys([_IDX, schema.CAPTION_LSH, schema.CAPTION, *Survivor.of(sel.dedup).columns]))
            .collect()
        )
        if ngram is None:
            ngram = check_caption_ngram(caption_ngram_sizes(frame))
        d = sel.dedup
        dups = caption_duplicates(pool, d.caption_jaccard, ngram, d.caption_verify, _IDX, survivor=Survivor.of(d))
    else:  # annotations from a run without annotate.caption_minhash: nothing to compare
        dups = duplicates_frame(_IDX)
    return _mark(frame, dups, Reason.DUPLICATE_CAPTION)


def caption_ngram_sizes(frame: pl.LazyFrame) -> list[int]:
    """The shingle sizes the band keys were built with (annotate.caption_ngram, recorded beside
    them as caption_lsh_ngram); [] for annotations from before it was recorded."""
    if schema.CAPTION_LSH_NGRAM not in frame.collect_schema().names():
        return []
    return frame.select(pl.col(schema.CAPTION_LSH_NGRAM).drop_nulls().unique()).collect().to_series().to_list()


def check_caption_ngram(sizes) -> int:
    """The one shingle size verification compares with (the default for annotations that did not
    record it). Shards built with different sizes cannot be compared: a clear error."""
    sizes = sorted(set(sizes))
    if len(sizes) > 1:
        raise ValueError(
            f"caption_lsh was built with different annotate.caption_ngram values in one run ({sizes}): "
            "caption near-duplicates cannot be verified across them; rerun with one value (curate run --overwrite)"
        )
    return int(sizes[0]) if sizes else DEFAULT_NGRAM


def _image_near_dedup(frame: pl.LazyFrame, sel: SelectionConfig, embeddings: pl.LazyFrame) -> pl.LazyFrame:
    """Near-duplicate images among eligible rows (filters/image_dedup.py): eager like captions."""
    emb = embeddings.select(
        pl.col(schema.SHARD).cast(pl.String),
        pl.col(schema.ROW).cast(pl.Int64),
        pl.col(schema.IMAGE_EMBEDDING),
        *([pl.col(schema.IMAGE_PHASH)] if schema.IMAGE_PHASH in embeddings.collect_schema().names() else []),
    )
    pool = (
        frame.filter(pl.col("_eligible"))
        .select(_IDX, *Survivor.of(sel.dedup).columns)
        .with_columns(pl.col(schema.SHARD).cast(pl.String), pl.col(schema.ROW).cast(pl.Int64))
        .join(emb, on=[schema.SHARD, schema.ROW], how="inner")
        .filter(pl.col(schema.IMAGE_EMBEDDING).is_not_null())
        .sort(_IDX)
        .collect()
    )
    d = sel.dedup
    kw = {}
    if d.image_phash_max_distance is not None:
        rows = pool.height
        hashed = rows - pool.get_column(schema.IMAGE_PHASH).null_count() if schema.IMAGE_PHASH in pool.columns else 0
        check_hashes(d.image_phash_max_distance, rows, hashed)
        kw["phash_max_distance"] = d.image_phash_max_distance
    dups = image_duplicates(
        pool,
        d.image_cosine,
        d.image_cluster_size,
        d.image_kmeans_iters,
        d.image_kmeans_seed,
        d.image_kmeans_sample,
        _IDX,
        survivor=Survivor.of(d),
        **kw,
    )
    return _mark(frame, dups, Reason.DUPLICATE_IMAGE_NEAR)


# near-duplicate steps (registry entries with near=True): whether the spec switches one on, and the
# step that returns its losers as (idx, of_uid, of_idx) among the eligible rows
NEAR_STEPS = _NEAR_STEPS = {
    Reason.DUPLICATE_CAPTION: (
        lambda sel: sel.dedup.caption_jaccard is not None,
        lambda frame, sel, embeddings, ngram=None: _caption_dedup(
            frame, sel, schema.CAPTION_LSH in frame.collect_schema().names(), ngram
        ),
    ),
    Reason.DUPLICATE_IMAGE_NEAR: (
        lambda sel: sel.dedup.image_cosine is not None,
        lambda frame, sel, embeddings, ngram=None: _image_near_dedup(frame, sel, embeddings),
    ),
}


def dedup_steps(sel: SelectionConfig) -> list[tuple[Reason, pl.Expr | None]]:
    """The dedup steps this selection runs, in registry order: (reason, key expression) for an
    exact dedup, (reason, None) for a near-duplicate step (NEAR_STEPS). One answer for both
    engines (curate/distributed_decide.py); a rule the spec switches off is not listed."""
    steps: list[tuple[Reason, pl.Expr | None]] = []
    for rule in DEDUP_RULES:
        reason = Reason(rule.reason)
        if rule.key is not None:
            key = rule.key(sel)
            if key is not None:
                steps.append((reason, key))
        elif reason in _NEAR_STEPS:
            if _NEAR_STEPS[reason][0](sel):
                steps.append((reason, None))
        else:
            raise RuntimeError(f"rule {reason.value} has no failure expression, dedup key or near-dedup step")
    return steps


def _off(frame: pl.LazyFrame, reason: Reason) -> pl.LazyFrame:
    """A dedup step the spec leaves off: no row fails it, nobody is its survivor."""
    return frame.with_columns(
        pl.lit(False).alias(_fail(reason)),
        pl.lit(None, pl.String).alias(_of(reason)),
        pl.lit(None, pl.UInt32).alias(f"{_of(reason)}_idx"),
    )


def decide(
    annotations: pl.LazyFrame,
    sel: SelectionConfig,
    *,
    explain: bool = True,
    embeddings: pl.LazyFrame | None = None,
    resolved: ResolvedSelection | None = None,
) -> tuple[pl.LazyFrame, ResolvedSelection]:
    """Add kept / reason / reasons / duplicate_of to every row. explain=False adds `kept` only
    (same decisions, no reason lists): what a threshold sweep needs, at a fraction of the cost.
    embeddings: (shard, row, image_embedding) rows, needed only by dedup.image_cosine
    (curate.annotations.scan_embeddings reads a run's embeddings/*.parquet). resolved: the CLIP
    rule already resolved over these annotations (the Ray engine ranks a top fraction shard by
    shard: curate/distributed_selection.py); None resolves it here.

    The rules and their order come from the registry (filters/rules.py): per-row rules first, as
    failure flags; then each dedup rule in turn among the rows still eligible."""
    survivor = Survivor.of(sel.dedup)  # dedup.survivor: which copy of a duplicate group is kept
    survivor.check(annotations.collect_schema())  # a priority column the annotations lack: a clear error
    check_rule_columns(sel, annotations.collect_schema())  # so is a per-group threshold's column (clip.by)
    sel = sel.model_copy(update={"engine": "ray" if on_ray(sel, annotations) else "local"})  # "auto" resolved once
    if resolved is None:
        resolved = resolve_clip_threshold(annotations, sel)
    if sel.concepts and resolved.concepts is None:  # over the concept score columns the caller joined in
        resolved = replace(resolved, concepts=concepts.resolve_thresholds(annotations, sel))
    fails = rule_failures(sel, resolved.clip_threshold, resolved.concepts)
    if sel.dedup.image_cosine is not None and embeddings is None:
        raise ValueError(
            "dedup.image_cosine is set but no image embeddings were given: the run needs "
            "score.store_embeddings = true (embeddings/<shard>.parquet), or set dedup.image_cosine = null"
        )
    frame = nan_free_scores(annotations.with_row_index(_IDX))
    frame = frame.with_columns(*[expr.alias(_fail(reason)) for reason, expr in fails.items()])
    frame = frame.with_columns(pl.any_horizontal([pl.col(_fail(r)) for r in fails]).not_().alias("_eligible"))

    active: list[Reason] = []  # dedup steps that ran, whose duplicates may need re-pointing
    keys: list[str] = []
    running = dict(dedup_steps(sel))
    for rule in DEDUP_RULES:
        reason = Reason(rule.reason)
        if reason not in running:
            frame = _off(frame, reason)
            continue
        key = running[reason]
        if key is not None:
            keys.append(f"_key_{reason.value}")
            frame = _dedup(frame.with_columns(key.alias(keys[-1])), keys[-1], "_eligible", reason, survivor)
        else:
            frame = _NEAR_STEPS[reason][1](frame, sel, embeddings)
        if rule.follow:  # an earlier duplicate whose survivor lost here names the final survivor
            for earlier in active:
                frame = _follow_survivor(frame, earlier, reason)
            active.append(reason)
        frame = frame.with_columns((pl.col("_eligible") & pl.col(_fail(reason)).not_()).alias("_eligible"))

    dedups = [Reason(r.reason) for r in DEDUP_RULES]
    helpers = ["_eligible", _IDX, *keys, *(f"{_of(r)}{suffix}" for r in dedups for suffix in ("", "_idx"))]
    if not explain:
        return frame.with_columns(pl.col("_eligible").alias(schema.KEPT)).drop(
            *map(_fail, reason_order(sel)), *helpers
        ), resolved

    frame = frame.with_columns(
        pl.coalesce(*(_of(r) for r in dedups)).alias("_of"),
        pl.coalesce(*(f"{_of(r)}_idx" for r in dedups)).alias("_of_idx"),
    )
    # the duplicate group's id is its survivor's uid, on the removed copies and on the survivor
    survivors = (
        frame.select(pl.col("_of_idx").alias(_IDX)).drop_nulls().unique().with_columns(pl.lit(True).alias("_survivor"))
    )
    frame = frame.join(survivors, on=_IDX, how="left")
    return explained(frame.drop(*helpers, "_of_idx"), reason_order(sel)), resolved


# the columns decide() adds to the annotation columns, in their order (what explained() makes)
DECIDED = (schema.REASONS, schema.KEPT, schema.REASON, schema.DUPLICATE_OF, schema.DUPLICATE_CLUSTER)


def explained(frame: pl.LazyFrame, order: Sequence[str] | None = None) -> pl.LazyFrame:
    """The decision columns from a frame holding every rule's failure flag (fail_column), `_of`
    (the survivor's uid, for a duplicate) and `_survivor` (some duplicate names this row): reasons
    (the rules it fails, in `order`: the selection's reason_order), kept, reason (the first),
    duplicate_of and duplicate_cluster (the group's survivor uid, on the copies and on the
    survivor). One definition for both engines; the helper columns are dropped."""
    order = reason_order() if order is None else order
    reasons = pl.concat_list(
        [pl.when(pl.col(_fail(r))).then(pl.lit(r)).otherwise(pl.lit(None, pl.String)) for r in order]
    ).list.drop_nulls()
    return (
        frame.with_columns(reasons.alias(schema.REASONS))
        .with_columns(
            (pl.col(schema.REASONS).list.len() == 0).alias(schema.KEPT),
            pl.col(schema.REASONS).list.first().alias(schema.REASON),
            pl.col("_of").alias(schema.DUPLICATE_OF),
        )
        .with_columns(
            pl.coalesce(schema.DUPLICATE_OF, pl.when(pl.col("_survivor")).then(pl.col(schema.UID))).alias(
                schema.DUPLICATE_CLUSTER
            )
        )
        .drop(*(_fail(r) for r in order), "_of", "_survivor")
    )
