"""Concept tags (selection.concepts): named sets of text prompts scored against the run's stored
image embeddings at select time, and the selection rule `concept` that removes the rows a tag fires
on, with reason concept:<name> (filters/rules.py). docs/POLICY.md "Concepts".

Score of a row for one concept, from its L2-normalised image embedding e (embeddings/<shard>.parquet,
score.store_embeddings) and the prompts' L2-normalised text embeddings:
  without negatives   max over the prompts p of cos(e, p)                          (in [-1, 1])
  with negatives      softmax over every prompt (prompts, then negatives) of
                      logit_scale * cos(e, .), summed over the prompts: CLIP's
                      zero-shot probability that e shows the concept rather than
                      a negative                                                   (in [0, 1])
logit_scale is the checkpoint's learned temperature (exp(logit_scale), ~100 for OpenAI CLIP).
The tag fires at score >= min_similarity, or, for top_fraction, at score >= the score of rank
int(N * top_fraction) among the N rows with an embedding (clip.top_fraction's ranking). A row
with no embedding has no score: it never fires, and is `not_scored` when nothing else explains it.

Only the text tower runs, once, in the driver (curate/model.py load_text_tower: no image tower
built, nothing fetched); the prompt embeddings are then plain arrays that travel to the Ray
engine's block tasks, which score their own shards' embeddings (curate/distributed_decide.py).
Both engines score shard by shard with the same numpy code, so their scores are the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl

from curate import annotations, exact_rank, schema
from curate.config import ConceptRule, SelectionConfig

MAX_COSINE = "max_cosine"
SOFTMAX_MASS = "softmax_positive_mass"


reason = schema.concept_reason  # concept:<name>, the registry's rule family (filters/rules.py)
column = schema.concept_column  # concept_<name>, the score column


def columns(sel: SelectionConfig) -> list[str]:
    return [column(n) for n in sel.concepts]


def scoring(rule: ConceptRule) -> str:
    return SOFTMAX_MASS if rule.negatives else MAX_COSINE


@dataclass(frozen=True)
class ConceptPrompts:
    """One concept's prompts and their text embeddings (float32, L2-normalised, one row each)."""

    name: str
    positive: np.ndarray
    negative: np.ndarray

    def scores(self, images: np.ndarray, logit_scale: float) -> np.ndarray:
        """float32 scores of `images` (n x d, L2-normalised), as the module doc defines them;
        computed in float64 (one code path for both engines)."""
        sims = images @ self.positive.T.astype(np.float64)
        if not len(self.negative):
            return sims.max(axis=1).astype(np.float32) if len(images) else np.zeros(0, np.float32)
        logits = logit_scale * np.concatenate([sims, images @ self.negative.T.astype(np.float64)], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p[:, : len(self.positive)].sum(axis=1) / p.sum(axis=1)).astype(np.float32)


@dataclass(frozen=True)
class ConceptSet:
    """Every concept of a selection, embedded once by the text tower of the model that made the
    image embeddings; `thresholds` once resolved (top fractions ranked over the pool)."""

    model_id: str
    logit_scale: float
    concepts: tuple[ConceptPrompts, ...]
    thresholds: tuple[tuple[str, float], ...] = ()

    def with_thresholds(self, thresholds: Mapping[str, float]) -> ConceptSet:
        return replace(self, thresholds=tuple((c.name, float(thresholds[c.name])) for c in self.concepts))

    def score_frame(self, shard: str, rows: np.ndarray, images: np.ndarray) -> pl.DataFrame:
        """(shard, row, concept_<name>...) for rows with an embedding."""
        images = images.astype(np.float64)
        return pl.DataFrame(
            [
                pl.Series(schema.SHARD, [shard] * len(rows), pl.String),
                pl.Series(schema.ROW, rows, pl.Int64),
                *(pl.Series(column(c.name), c.scores(images, self.logit_scale), pl.Float32) for c in self.concepts),
            ]
        )


def embed(sel: SelectionConfig, model: Mapping[str, Any]) -> ConceptSet | None:
    """The selection's concepts embedded by the text tower of `model` (the run's embeddings'
    model: embeddings_model()); None without concepts (nothing is loaded then). The tower must be
    the very checkpoint that made the image embeddings: its model_id is checked against theirs."""
    if not sel.concepts:
        return None
    # lazy: torch and open_clip (seconds), only for a selection with concepts: the text tower alone
    from curate.model import load_text_tower

    tower = load_text_tower(model["model"], model["pretrained"])
    if tower.model_id != model["model_id"]:
        raise ValueError(
            f"selection.concepts: the text tower loaded as {tower.model_id!r}, but the image embeddings were made "
            f"by {model['model_id']!r}; their similarities would mean nothing (is the checkpoint the run used "
            "still at the same path, unchanged?)"
        )
    concepts = []
    for name, rule in sel.concepts.items():
        texts = [*rule.prompts, *rule.negatives]
        emb = tower.encode(texts).astype(np.float32)
        concepts.append(ConceptPrompts(name, emb[: len(rule.prompts)], emb[len(rule.prompts) :]))
    return ConceptSet(tower.model_id, tower.logit_scale, tuple(concepts))


def embeddings_model(manifest: Mapping[str, Any], run_dir: str) -> dict[str, Any]:
    """{model, pretrained, model_id} of the model whose image embeddings the run stored: the
    precomputed embeddings' model when the run read them with its input (manifest
    "embeddings_model"), else the scorer's (manifest "model"). A clear error naming the run when
    neither describes an open_clip model."""
    m = manifest.get("embeddings_model") or manifest.get("model") or {}
    if not all(m.get(k) for k in ("model", "pretrained", "model_id")):
        raise ValueError(
            f"{run_dir}: selection.concepts needs the model that made the image embeddings, and the manifest "
            f"names none ({m.get('model_id') or 'no model'}); concepts need a run with score.source = 'model' and "
            "score.store_embeddings = true"
        )
    return {k: m[k] for k in ("model", "pretrained", "model_id")}


def check_embeddings(run_dir: str, shards: Sequence[str]) -> None:
    """A clear error when the run stored no image embeddings for concepts to score."""
    if annotations.scan_embeddings(run_dir, list(shards)) is None:
        raise ValueError(
            f"{run_dir}: selection.concepts scores image embeddings, but the run has no embeddings/<shard>.parquet; "
            "rerun with score.store_embeddings = true"
        )


def shard_scores(run_dir: str, shard: str, concepts: ConceptSet) -> pl.DataFrame:
    """(shard, row, concept_<name>...) of one shard's rows with an image embedding; an empty frame
    when the shard has no embeddings file."""
    emb = annotations.scan_embeddings(run_dir, [shard])
    if emb is None:
        return concepts.score_frame(shard, np.zeros(0, np.int64), np.zeros((0, 1), np.float32))
    emb = emb.select(schema.ROW, schema.IMAGE_EMBEDDING).filter(pl.col(schema.IMAGE_EMBEDDING).is_not_null()).collect()
    rows = emb.get_column(schema.ROW).to_numpy()
    if not len(rows):
        return concepts.score_frame(shard, rows, np.zeros((0, 1), np.float32))
    vec = emb.get_column(schema.IMAGE_EMBEDDING)
    d = vec.list.len()[0]
    x = np.asarray(vec.explode().cast(pl.Float32).to_numpy(), dtype=np.float32).reshape(len(rows), d)
    return concepts.score_frame(shard, rows, x)


def with_scores(frame: pl.LazyFrame, run_dir: str, shards: Iterable[str], concepts: ConceptSet | None) -> pl.LazyFrame:
    """`frame` (annotation rows of `shards`) with each concept's score column, by (shard, row);
    the scores are computed here, shard by shard (null for rows without an embedding). Unchanged
    without concepts."""
    if concepts is None:
        return frame
    scores = pl.concat([shard_scores(run_dir, s, concepts) for s in shards])
    names = frame.collect_schema()  # the keys joined in the annotations' own types
    scores = scores.with_columns(
        pl.col(schema.SHARD).cast(names[schema.SHARD]), pl.col(schema.ROW).cast(names[schema.ROW])
    )
    return frame.join(scores.lazy(), on=[schema.SHARD, schema.ROW], how="left", maintain_order="left")


# --- thresholds --------------------------------------------------------------------------------------


def resolve_thresholds(frame: pl.LazyFrame, sel: SelectionConfig) -> dict[str, float]:
    """Each concept's score threshold over `frame` (rows with the concept columns: with_scores):
    min_similarity as given; a top fraction ranked over the rows with a score."""
    out: dict[str, float] = {}
    for name, rule in sel.concepts.items():
        if rule.min_similarity is not None:
            out[name] = float(rule.min_similarity)
            continue
        scores = frame.select(pl.col(column(name)).cast(pl.Float64)).drop_nulls().collect().to_series()
        out[name] = _ranked(scores.sort(descending=True), rule.top_fraction, name)
    return out


def _ranked(descending: pl.Series | np.ndarray, fraction: float, name: str) -> float:
    n = len(descending)
    if n == 0:
        raise ValueError(f"selection.concepts.{name}.top_fraction: no row has an image embedding; nothing to rank")
    return float(descending[exact_rank.top_fraction_index(n, fraction)])


def shard_score_counts(
    run_dir: str, shard: str, prefix: int, done: int, width: int, concepts: ConceptSet, name: str
) -> exact_rank.Counts:
    """One pass of the radix select (curate/exact_rank.py) over one shard's scores of a concept
    (a task of the Ray engine: curate/distributed_selection.py concept_thresholds_on)."""
    scores = shard_scores(run_dir, shard, concepts).get_column(column(name)).cast(pl.Float64).to_numpy()
    return exact_rank.pass_counts(exact_rank.order_keys(scores), prefix, done, width)


def describe(
    sel: SelectionConfig, concepts: ConceptSet | None, thresholds: Mapping[str, float]
) -> dict[str, Any] | None:
    """The concept policy as the selection applied it (selection.json, the manifest, the report):
    the prompts, the embeddings' model, the scoring, the rule and the resolved threshold."""
    if concepts is None:
        return None
    return {
        "model_id": concepts.model_id,
        "logit_scale": concepts.logit_scale,
        "scoring": {
            MAX_COSINE: "without negatives: the highest cosine of the image embedding to the prompts",
            SOFTMAX_MASS: "with negatives: softmax over the prompts and negatives of logit_scale x cosine, "
            "the probability mass on the prompts",
        },
        "concepts": {
            name: {
                "reason": reason(name),
                "column": column(name),
                "prompts": list(rule.prompts),
                "negatives": list(rule.negatives),
                "scoring": scoring(rule),
                "min_similarity": rule.min_similarity,
                "top_fraction": rule.top_fraction,
                "threshold": thresholds.get(name),
            }
            for name, rule in sel.concepts.items()
        },
    }
