"""The rule registry: every selection rule declared once, in the order rules are checked.

A rule declares its reason (the `reason` column's value), its phase, the annotation columns it
reads, its failure (a polars expression: true means the row fails; or, for an exact dedup, the
key whose repeats are duplicates), its help text and its `curate select` flags. Everything else is
derived from this table: the check order (RULE_ORDER), the report's help table (REASON_HELP), the
text rules that decide what is fetched (text_rules_pass), the sweep's inputs (RULE_INPUTS), the
CLI's flags (curate/cli.py) and decide()'s dedup cascade (filters/decide.py).

Adding a rule is one entry here plus, when it has settings, a field in curate/config.py.

Null annotations never fail a rule by accident: a missing score is `not_scored`, a failed fetch is
`fetch_failed`; each case has its own reason. A rule switched off in the spec fails nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
import tomllib
from typing import Any, Literal

import polars as pl

from curate import schema
from curate.config import CaptionRule, ClipRule, ImageRule, LanguageRule, SelectionConfig
from curate.schema import FetchStatus

# every fetch outcome except ok, opt_out and the never-fetched ones is a failure
FETCH_FAILURES = [
    s.value
    for s in FetchStatus
    if s not in (FetchStatus.OK, FetchStatus.OPT_OUT, FetchStatus.NOT_ATTEMPTED, FetchStatus.NOT_NEEDED)
]

_FALSE = pl.lit(False)

# input: the row itself (no annotation); text: caption and URL annotations, checked before any fetch
# (they decide what is worth fetching); fetch: what the download told us; score: the model's score;
# dedup: among the rows every earlier rule kept
Phase = Literal["input", "text", "fetch", "score", "dedup"]


@dataclass(frozen=True)
class RuleContext:
    """What a failure expression may need beyond the spec: values resolved from the whole pool."""

    clip_threshold: float | None = None  # min_score, or the score a top_fraction resolved to
    concepts: Mapping[str, float] = field(default_factory=dict)  # each concept's score threshold, resolved


@dataclass(frozen=True)
class Flag:
    """One `curate select` option: `decl` as typer takes it, the selection key it sets (dotted, under
    `selection.`), and how the value is applied (default: set the key)."""

    decl: str  # "--min-words", or "--dedup-url/--no-dedup-url" for a bool
    key: str  # "caption.min_words"
    type: type  # int, float, bool, str
    help: str = ""
    apply: Callable[[dict, Any], None] | None = None  # custom: (selection dict, value) -> None
    # a section the flag replaces as a whole: reset to its defaults (once) before any flag is set,
    # so `--clip-top-fraction` drops the spec's min_score, and giving both thresholds is an error
    resets: str | None = None

    @property
    def is_switch(self) -> bool:
        """A plain on-switch (`--no-clip`): False when not given. `--x/--no-x` bools are None then."""
        return self.type is bool and "/" not in self.decl

    @property
    def param(self) -> str:
        """The Python parameter name typer passes the value as."""
        return self.decl.split("/")[0].lstrip("-").replace("-", "_")

    def set(self, data: dict, value: Any) -> None:
        if self.apply is not None:
            self.apply(data, value)
            return
        *parents, leaf = self.key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value


@dataclass(frozen=True)
class Rule:
    """One selection rule. A per-row rule has `fails`; an exact dedup has `key` (rows with the same
    non-null key are duplicates; None when the rule is switched off); a near dedup is a step of
    filters/decide.py (`near = True`)."""

    name: str  # the Reason member's name
    reason: str  # the value of the `reason` column
    phase: Phase
    help: str
    inputs: tuple[str, ...] = ()
    fails: Callable[[SelectionConfig, RuleContext], pl.Expr] | None = None
    key: Callable[[SelectionConfig], pl.Expr | None] | None = None
    near: bool = False
    # re-point earlier duplicates whose survivor loses this dedup (duplicate_of names a kept row);
    # not for the uid step: a uid group's survivor has the uid its copies point at
    follow: bool = True
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    # a family of per-row rules, one per name the spec gives (concepts): each instance fails by
    # instance_fails and has the reason "<reason>:<name>", checked at the family's place in the order;
    # instance_inputs: the columns they read (added to the annotations at select time)
    names: Callable[[SelectionConfig], tuple[str, ...]] | None = None
    instance_fails: Callable[[SelectionConfig, RuleContext, str], pl.Expr] | None = None
    instance_help: Callable[[SelectionConfig, str], str] | None = None
    instance_inputs: Callable[[SelectionConfig], tuple[str, ...]] | None = None
    # columns the spec names for this rule (the CLIP rule's per-group `by` column): read as inputs too
    spec_inputs: Callable[[SelectionConfig], tuple[str, ...]] | None = None

    def inputs_for(self, sel: SelectionConfig) -> tuple[str, ...]:
        """Every column this rule reads under this selection: `inputs`, then what the spec names."""
        named = self.spec_inputs(sel) if self.spec_inputs is not None else ()
        return tuple(dict.fromkeys([*self.inputs, *named]))


# --- per-row failure expressions -------------------------------------------------------------------


def missing_url_fails() -> pl.Expr:
    """A row with no URL (null, empty or blank): always removed, whatever the spec."""
    url = pl.col(schema.URL)
    return (url.is_null() | (url.str.strip_chars() == "")).fill_null(True)


def language_fails(rule: LanguageRule) -> pl.Expr:
    expr = _FALSE
    if rule.allow:
        expr = expr | pl.col(schema.LANGUAGE).is_in(rule.allow).not_().fill_null(True)
    if rule.min_confidence > 0:
        expr = expr | (pl.col(schema.LANGUAGE_SCORE) < rule.min_confidence).fill_null(True)
    return expr


def caption_fails(rule: CaptionRule) -> pl.Expr:
    expr = _FALSE
    if rule.min_words:
        expr = expr | (pl.col(schema.CAPTION_WORDS) < rule.min_words)
    if rule.max_words is not None:
        expr = expr | (pl.col(schema.CAPTION_WORDS) > rule.max_words)
    if rule.min_chars:
        expr = expr | (pl.col(schema.CAPTION_CHARS) < rule.min_chars)
    if rule.max_chars is not None:
        expr = expr | (pl.col(schema.CAPTION_CHARS) > rule.max_chars)
    return expr


def fetch_fails() -> pl.Expr:
    return pl.col(schema.FETCH_STATUS).is_in(FETCH_FAILURES)


def opt_out_fails() -> pl.Expr:
    return pl.col(schema.FETCH_STATUS) == FetchStatus.OPT_OUT.value


def _dims() -> tuple[pl.Expr, pl.Expr]:
    w = pl.col(schema.ORIGINAL_WIDTH).cast(pl.Float64)
    h = pl.col(schema.ORIGINAL_HEIGHT).cast(pl.Float64)
    return pl.min_horizontal(w, h), pl.max_horizontal(w, h)


def image_rule_active(rule: ImageRule) -> bool:
    return rule.min_side > 0 or rule.max_aspect is not None


def image_fails(rule: ImageRule) -> pl.Expr:
    lo, hi = _dims()
    expr = _FALSE
    if rule.min_side > 0:
        expr = expr | (lo < rule.min_side).fill_null(False)
    if rule.max_aspect is not None:
        expr = expr | ((hi / lo) > rule.max_aspect).fill_null(False) | (lo <= 0).fill_null(False)
    return expr


def not_scored(sel: SelectionConfig, clip_active: bool) -> pl.Expr:
    """Rows a rule needs an annotation for that an earlier, stricter run never produced
    (it skipped the row before fetching). Reported, never guessed."""
    skipped = pl.col(schema.FETCH_STATUS) == FetchStatus.NOT_ATTEMPTED.value
    lo, _ = _dims()
    expr = _FALSE
    if clip_active:
        expr = expr | (pl.col(schema.CLIP_SCORE).is_null() & fetch_fails().not_() & opt_out_fails().not_())
    if image_rule_active(sel.image):
        expr = expr | (lo.is_null() & skipped)
    if sel.concepts:  # a concept needs the image embedding: a row whose fetch explains none has not been embedded
        no_embedding = pl.any_horizontal([pl.col(schema.concept_column(n)).is_null() for n in sel.concepts])
        expr = expr | (no_embedding & fetch_fails().not_() & opt_out_fails().not_())
    # a row without a URL is never fetched and never will be: missing_url, not "rerun to score it"
    return expr & missing_url_fails().not_()


def clip_fails(threshold: float | None, clip: ClipRule | None = None) -> pl.Expr:
    """clip_score < the row's threshold: `threshold` (min_score, or what a top fraction resolved to),
    or with per-group thresholds (clip.by) the threshold clip.thresholds names for the row's value
    of clip.by, compared as text; null and unlisted values take `threshold`. Each comparison is the
    score column against a literal, as for one threshold: polars casts the literal to the score's
    type, so a float32 score is compared with float32(threshold) in every group. No score: fails
    nothing here (not_scored)."""
    if threshold is None:
        return _FALSE
    score = pl.col(schema.CLIP_SCORE)
    if clip is None or clip.by is None:
        return (score < threshold).fill_null(False)
    group = pl.col(clip.by).cast(pl.String)
    chain: Any = pl
    for value, t in clip.thresholds.items():
        chain = chain.when(group == value).then(score < t)
    return chain.otherwise(score < threshold).fill_null(False)


def clip_by(sel: SelectionConfig) -> tuple[str, ...]:
    """The column per-group CLIP thresholds are chosen by, if any: an input of the CLIP rule."""
    return (sel.clip.by,) if sel.clip.by is not None and sel.clip.thresholds else ()


def concept_fails(name: str, threshold: float) -> pl.Expr:
    """The tag of concept `name` fires: its score (curate/concepts.py) at or above the threshold. A
    row without an image embedding has no score and never fires (not_scored reports it)."""
    return (pl.col(schema.concept_column(name)) >= threshold).fill_null(False)


def concept_help(sel: SelectionConfig, name: str) -> str:
    """The report's line for concept `name`: its prompts, scoring and rule."""
    rule = sel.concepts[name]
    how = (
        f"softmax mass on the prompts against {len(rule.negatives)} negative prompt(s)"
        if rule.negatives
        else "highest cosine over the prompts"
    )
    cut = (
        f">= {rule.min_similarity}"
        if rule.min_similarity is not None
        else f"in the top {rule.top_fraction:.4g} of rows with an embedding"
    )
    prompts = "; ".join(repr(p) for p in rule.prompts[:3]) + (" ..." if len(rule.prompts) > 3 else "")
    return f"the image matches concept {name!r} ({prompts}): {how} {cut}"


# --- exact dedup keys ------------------------------------------------------------------------------


def url_key(sel: SelectionConfig) -> pl.Expr | None:
    """The normalised URL, or (LAION's rule, url_key = "url_caption") the URL and caption together."""
    if not sel.dedup.url:
        return None
    url = pl.col(schema.URL_NORMALIZED)
    if sel.dedup.url_key == "url":
        return url
    both = pl.concat_str([url, pl.col(schema.CAPTION).fill_null("")], separator="\x00")
    return pl.when(url.is_not_null()).then(both)


def normalized_caption(caption: pl.Expr) -> pl.Expr:
    """A caption for exact dedup: lower case, Unicode punctuation removed, runs of whitespace as one
    space, trimmed ("A Dog, running!" == "a dog running"). Digits stay ("iPhone 11" is not
    "iPhone 12"). Null when nothing is left: an empty caption duplicates nothing."""
    text = caption.str.to_lowercase().str.replace_all(r"\p{P}+", " ").str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(text != "").then(text)


def caption_exact_key(sel: SelectionConfig) -> pl.Expr | None:
    return normalized_caption(pl.col(schema.CAPTION)) if sel.dedup.caption_exact else None


# --- CLI flags with their own handling -------------------------------------------------------------


def _no_clip(data: dict, value: bool) -> None:
    """--no-clip (a switch: False when not given) wins over a threshold given with it."""
    if value:
        data["clip"] = {"min_score": None, "top_fraction": None}


def _clip_thresholds(data: dict, value: str) -> None:
    """--clip-thresholds 'language:en=0.28,de=0.27': clip.by and clip.thresholds (with --clip-min-score,
    the default for every other value)."""
    column, sep, pairs = value.partition(":")
    groups: dict[str, float] = {}
    for item in pairs.split(","):
        group, eq, t = item.strip().partition("=")
        try:
            groups[group.strip()] = float(t)
        except ValueError:
            eq = ""
        if not (sep and eq and column.strip() and group.strip()):
            raise ValueError(
                f"--clip-thresholds {value!r}: write COLUMN:VALUE=THRESHOLD,..., e.g. 'language:en=0.28' "
                "(with --clip-min-score for every other value)"
            )
    data["clip"]["by"], data["clip"]["thresholds"] = column.strip(), groups


def _languages(data: dict, value: str) -> None:
    data["language"]["allow"] = [x.strip() for x in value.split(",") if x.strip()]


def _concepts_file(data: dict, path: str) -> None:
    """--concepts FILE: the file's [concepts.<name>] tables replace the spec's concepts."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--concepts {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--concepts {path}: not valid TOML: {e}") from None
    if set(raw) != {"concepts"} or not isinstance(raw["concepts"], dict):
        raise ValueError(f"--concepts {path}: expected only [concepts.<name>] tables, found {sorted(raw)}")
    data["concepts"] = raw["concepts"]


def _no_concepts(data: dict, value: bool) -> None:
    if value:
        data["concepts"] = {}


# --- the registry ----------------------------------------------------------------------------------

# A row without a URL first (there is nothing to fetch, deduplicate or deliver), then the text
# rules (they decide what is worth fetching), then what the fetch tells us, then the model's
# score, then dedup last: a duplicate's survivor is chosen among copies that pass every other
# rule, so dedup must see the outcome of all of them. duplicate_uid is the very last step: of what
# every other rule and dedup left, one row per uid is kept, so uids.npy has one entry per kept row.
RULES: tuple[Rule, ...] = (
    Rule(
        "MISSING_URL",
        "missing_url",
        "input",
        "the row has no URL (null, empty or blank): nothing to fetch, deduplicate or deliver",
        inputs=(schema.URL,),
        fails=lambda sel, ctx: missing_url_fails(),
    ),
    Rule(
        "LANGUAGE",
        "language",
        "text",
        "caption language not in the allow-list, or detected with too little confidence",
        inputs=(schema.LANGUAGE, schema.LANGUAGE_SCORE),
        fails=lambda sel, ctx: language_fails(sel.language),
        flags=(
            Flag("--languages", "language.allow", str, "comma-separated allow-list, e.g. en,de ('' = any)", _languages),
            Flag("--min-language-confidence", "language.min_confidence", float),
        ),
    ),
    Rule(
        "CAPTION_LENGTH",
        "caption_length",
        "text",
        "caption too short or too long (words or characters)",
        inputs=(schema.CAPTION_WORDS, schema.CAPTION_CHARS),
        fails=lambda sel, ctx: caption_fails(sel.caption),
        flags=(
            Flag("--min-words", "caption.min_words", int),
            Flag("--max-words", "caption.max_words", int, "at most this many words (caption_words)"),
            Flag("--min-chars", "caption.min_chars", int),
            Flag("--max-chars", "caption.max_chars", int),
        ),
    ),
    Rule(
        "FETCH_FAILED",
        "fetch_failed",
        "fetch",
        "image could not be downloaded or decoded (see fetch_status / fetch_error)",
        inputs=(schema.FETCH_STATUS,),
        fails=lambda sel, ctx: fetch_fails(),
    ),
    Rule(
        "OPT_OUT",
        "opt_out",
        "fetch",
        "the server opted the image out of AI use (X-Robots-Tag noai / noimageai / our user agent's token)",
        inputs=(schema.FETCH_STATUS,),
        fails=lambda sel, ctx: opt_out_fails(),
    ),
    Rule(
        "IMAGE_SIZE",
        "image_size",
        "fetch",
        "image smaller than the minimum side, or aspect ratio too extreme",
        inputs=(schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT),
        fails=lambda sel, ctx: image_fails(sel.image),
        flags=(
            Flag("--min-side", "image.min_side", int, "minimum image side in pixels"),
            Flag("--max-aspect", "image.max_aspect", float),
        ),
    ),
    Rule(
        "NOT_SCORED",
        "not_scored",
        "score",
        "row has no CLIP score (or, with concepts, no image embedding) because an earlier, stricter run skipped it; "
        "rerun to score it",
        inputs=(schema.CLIP_SCORE, schema.FETCH_STATUS, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, schema.URL),
        fails=lambda sel, ctx: not_scored(sel, ctx.clip_threshold is not None),
    ),
    Rule(
        "CLIP_SCORE",
        "clip_score",
        "score",
        "image-text similarity below the threshold",
        inputs=(schema.CLIP_SCORE,),
        spec_inputs=clip_by,
        fails=lambda sel, ctx: clip_fails(ctx.clip_threshold, sel.clip),
        flags=(
            Flag("--clip-min-score", "clip.min_score", float, "keep rows with clip_score >= this", resets="clip"),
            Flag(
                "--clip-top-fraction",
                "clip.top_fraction",
                float,
                "keep the top fraction by clip_score (DataComp --fraction)",
                resets="clip",
            ),
            Flag(
                "--clip-thresholds",
                "clip.thresholds",
                str,
                "per-group thresholds, COLUMN:VALUE=T,... e.g. 'language:en=0.28'; --clip-min-score is every other "
                "value's",
                _clip_thresholds,
                resets="clip",
            ),
            Flag("--no-clip", "clip", bool, "switch the CLIP rule off", _no_clip, resets="clip"),
        ),
    ),
    Rule(
        "CONCEPT",
        schema.CONCEPT,
        "score",
        "the image matches a concept of selection.concepts (its stored embedding scored against the concept's "
        "text prompts); one reason per concept, concept:<name>",
        names=lambda sel: tuple(sel.concepts),
        instance_fails=lambda sel, ctx, name: concept_fails(name, ctx.concepts[name]),
        instance_help=concept_help,
        instance_inputs=lambda sel: tuple(schema.concept_column(n) for n in sel.concepts),
        flags=(
            Flag(
                "--concepts",
                "concepts",
                str,
                "a TOML file of [concepts.<name>] tables (prompts, negatives, min_similarity or top_fraction) that "
                "replace the spec's concepts",
                _concepts_file,
            ),
            Flag("--no-concepts", "concepts", bool, "switch every concept rule off", _no_concepts),
        ),
    ),
    Rule(
        "DUPLICATE_URL",
        "duplicate_url",
        "dedup",
        "another row has the same normalised URL; duplicate_of names the survivor",
        inputs=(schema.URL_NORMALIZED, schema.CAPTION),
        key=url_key,
        flags=(Flag("--dedup-url/--no-dedup-url", "dedup.url", bool),),
    ),
    Rule(
        "DUPLICATE_IMAGE",
        "duplicate_image",
        "dedup",
        "another row has the same image bytes (sha256); duplicate_of names the survivor",
        inputs=(schema.IMAGE_SHA256,),
        key=lambda sel: pl.col(schema.IMAGE_SHA256) if sel.dedup.image_sha256 else None,
        flags=(Flag("--dedup-image/--no-dedup-image", "dedup.image_sha256", bool),),
    ),
    Rule(
        "DUPLICATE_CAPTION_EXACT",
        "duplicate_caption_exact",
        "dedup",
        "another row has the same caption up to case, whitespace and punctuation; duplicate_of names the survivor",
        inputs=(schema.CAPTION,),
        key=caption_exact_key,
        flags=(Flag("--dedup-caption-exact/--no-dedup-caption-exact", "dedup.caption_exact", bool),),
    ),
    Rule(
        "DUPLICATE_CAPTION",
        "duplicate_caption",
        "dedup",
        "another row's caption is a near-duplicate (MinHash LSH, word n-gram Jaccard >= dedup.caption_jaccard); "
        "duplicate_of names the survivor",
        inputs=(schema.CAPTION, schema.CAPTION_LSH, schema.CAPTION_LSH_NGRAM),
        near=True,
        flags=(
            Flag(
                "--caption-jaccard",
                "dedup.caption_jaccard",
                float,
                "near-duplicate captions: word n-gram Jaccard at or above this (0 = off; needs the run's band keys)",
                apply=lambda data, v: data["dedup"].__setitem__("caption_jaccard", v or None),
            ),
        ),
    ),
    Rule(
        "DUPLICATE_IMAGE_NEAR",
        "duplicate_image_near",
        "dedup",
        "another row's image is a near-duplicate (CLIP image embedding cosine >= dedup.image_cosine within a "
        "k-means cluster); duplicate_of names the survivor",
        near=True,
        flags=(
            Flag(
                "--image-cosine",
                "dedup.image_cosine",
                float,
                "near-duplicate images: CLIP embedding cosine at or above this (0 = off; needs stored embeddings)",
                apply=lambda data, v: data["dedup"].__setitem__("image_cosine", v or None),
            ),
        ),
    ),
    Rule(
        "DUPLICATE_UID",
        "duplicate_uid",
        "dedup",
        "another kept row has the same uid (a repeated input row or uid); duplicate_of names the survivor, so kept "
        "uids are unique",
        inputs=(schema.UID,),
        key=lambda sel: pl.col(schema.UID),
        follow=False,
    ),
)

# rule families (concepts) give one reason per name in the spec ("concept:<name>"): they are not
# members of Reason, and take their place in a selection's order through reason_order(sel)
FAMILIES: tuple[Rule, ...] = tuple(r for r in RULES if r.names is not None)
Reason = Enum("Reason", {r.name: r.reason for r in RULES if r.names is None}, type=str)  # type: ignore[misc]
Reason.__doc__ = "Why a row was removed; members in the order rules are checked (filters/rules.py RULES)."
BY_REASON: dict[Reason, Rule] = {Reason(r.reason): r for r in RULES if r.names is None}
RULE_ORDER: tuple[Reason, ...] = tuple(Reason(r.reason) for r in RULES if r.names is None)
REASON_HELP: dict[Reason, str] = {Reason(r.reason): r.help for r in RULES if r.names is None}
ROW_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r.fails is not None)
DEDUP_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r.phase == "dedup")
FLAGS: tuple[Flag, ...] = tuple(f for r in RULES for f in r.flags)
# what a selection reads besides the identity columns: the sweep keeps only these through decide()
RULE_INPUTS: tuple[str, ...] = tuple(
    dict.fromkeys([schema.SHARD, schema.ROW, schema.UID, *(c for r in RULES for c in r.inputs)])
)


def rule_inputs(sel: SelectionConfig) -> tuple[str, ...]:
    """RULE_INPUTS and the columns this selection's rules name (a per-group CLIP rule's `by`)."""
    return tuple(dict.fromkeys([*RULE_INPUTS, *(c for r in RULES for c in r.inputs_for(sel))]))


def check_rule_columns(sel: SelectionConfig, columns: Any) -> None:
    """A ValueError naming the column when a column the spec names for a rule (clip.by) is not in
    the annotations (`columns`: their names or schema): polars would fail later with less to go on."""
    have = set(columns)
    for rule in RULES:
        missing = [c for c in rule.inputs_for(sel) if c not in rule.inputs and c not in have]
        if missing:
            raise ValueError(
                f"rule {rule.reason}: the selection names column {missing[0]!r} (selection.clip.by), which is not a "
                "column of the annotations "
                "(input columns reach them only through input.keep_columns, at `curate run`); annotation columns: "
                + ", ".join(sorted(have))
            )


def reason_order(sel: SelectionConfig | None = None) -> tuple[str, ...]:
    """Every reason selection `sel` can give, in the order rules are checked: RULE_ORDER with each
    rule family (concepts) expanded to "<reason>:<name>" per name `sel` gives, at its place."""
    out: list[str] = []
    for r in RULES:
        if r.names is None:
            out.append(r.reason)
        elif sel is not None:
            out.extend(f"{r.reason}:{n}" for n in r.names(sel))
    return tuple(out)


def reason_help(sel: SelectionConfig | None = None) -> dict[str, str]:
    """{reason: help text} in reason_order(sel): the report's reason table."""
    out: dict[str, str] = {}
    for r in RULES:
        if r.names is None:
            out[r.reason] = r.help
        elif sel is not None:
            out.update({f"{r.reason}:{n}": r.instance_help(sel, n) for n in r.names(sel)})
    return out


def row_reasons(sel: SelectionConfig) -> tuple[str, ...]:
    """The reasons of `sel`'s per-row rules (no dedup), in order: rule_failures' keys."""
    dedup = {r.reason for r in DEDUP_RULES}
    return tuple(r for r in reason_order(sel) if r not in dedup)


def family_inputs(sel: SelectionConfig) -> tuple[str, ...]:
    """The columns `sel`'s rule families read (concept scores: added to the annotations at select
    time, curate/concepts.py)."""
    return tuple(c for r in FAMILIES for c in r.instance_inputs(sel))


def rule_failures(
    sel: SelectionConfig, clip_threshold: float | None, concept_thresholds: Mapping[str, float] | None = None
) -> dict[str, pl.Expr]:
    """Every per-row rule's failure expression by reason, in reason_order(sel). concept_thresholds:
    each concept's resolved score threshold (curate/concepts.py), needed when `sel` has concepts."""
    ctx = RuleContext(clip_threshold, dict(concept_thresholds or {}))
    missing = [n for n in sel.concepts if n not in ctx.concepts]
    if missing:
        raise ValueError(f"selection.concepts {missing}: no resolved threshold given")
    out: dict[str, pl.Expr] = {}
    for r in RULES:
        if r.fails is not None:
            out[r.reason] = r.fails(sel, ctx)
        elif r.names is not None:
            out.update({f"{r.reason}:{n}": r.instance_fails(sel, ctx, n) for n in r.names(sel)})
    return out


def text_rules_pass(sel: SelectionConfig) -> pl.Expr:
    """The cheap rules (phases input and text) that decide whether a row is worth fetching and
    scoring at all. With no text rule active the language and caption parts are literals; the URL
    rule reads a column, so the expression always has one value per row (use text_rules_mask for a
    Series)."""
    ctx = RuleContext()
    return pl.any_horizontal([r.fails(sel, ctx) for r in ROW_RULES if r.phase in ("input", "text")]).not_()


def text_rules_mask(frame: pl.DataFrame, sel: SelectionConfig, where: pl.Expr | None = None) -> pl.Series:
    """text_rules_pass (and `where`, if given) as a Boolean Series of exactly frame.height values:
    with_columns broadcasts a literal to the frame's height where select() would not."""
    expr = text_rules_pass(sel) if where is None else where & text_rules_pass(sel)
    return (
        frame.with_columns(expr.fill_null(False).alias("_text_rules_pass"))
        .get_column("_text_rules_pass")
        .cast(pl.Boolean)
    )


def apply_flags(data: dict, values: dict[str, Any]) -> dict:
    """Set the given `curate select` flag values (by parameter name; None, or False for a switch,
    means not given) on a selection dict (SelectionConfig.model_dump), in registry order."""
    given = [f for f in FLAGS if values.get(f.param) is not None and not (f.is_switch and values[f.param] is False)]
    for section in dict.fromkeys(f.resets for f in given if f.resets):
        data[section] = SelectionConfig.model_fields[section].default.model_dump(mode="json")
    for flag in given:
        flag.set(data, values[flag.param])
    return data
