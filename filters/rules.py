"""Selection rules as polars expressions over annotation columns.

Each rule is a boolean *failure* expression: true means the row fails that rule. A rule that is
switched off in the spec fails nothing. Null annotations never fail a rule by accident: a missing
score is `not_scored`, a failed fetch is `fetch_failed`; each case has its own reason.
"""

from __future__ import annotations

import polars as pl

from curate import schema
from curate.config import CaptionRule, ImageRule, LanguageRule, SelectionConfig
from curate.schema import FetchStatus, Reason

# every fetch outcome except ok, opt_out and the never-fetched ones is a failure
FETCH_FAILURES = [
    s.value
    for s in FetchStatus
    if s not in (FetchStatus.OK, FetchStatus.OPT_OUT, FetchStatus.NOT_ATTEMPTED, FetchStatus.NOT_NEEDED)
]

_FALSE = pl.lit(False)


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
    if rule.min_chars:
        expr = expr | (pl.col(schema.CAPTION_CHARS) < rule.min_chars)
    if rule.max_chars is not None:
        expr = expr | (pl.col(schema.CAPTION_CHARS) > rule.max_chars)
    return expr


def missing_url_fails() -> pl.Expr:
    """A row with no URL (null, empty or blank): always removed, whatever the spec."""
    url = pl.col(schema.URL)
    return (url.is_null() | (url.str.strip_chars() == "")).fill_null(True)


def text_rules_pass(sel: SelectionConfig) -> pl.Expr:
    """The cheap rules that decide whether a row is worth fetching and scoring at all. With no text
    rule active the language and caption parts are literals; the URL rule reads a column, so the
    expression always has one value per row (use text_rules_mask for a Series)."""
    return (missing_url_fails() | language_fails(sel.language) | caption_fails(sel.caption)).not_()


def text_rules_mask(frame: pl.DataFrame, sel: SelectionConfig, where: pl.Expr | None = None) -> pl.Series:
    """text_rules_pass (and `where`, if given) as a Boolean Series of exactly frame.height values:
    with_columns broadcasts a literal to the frame's height where select() would not."""
    expr = text_rules_pass(sel) if where is None else where & text_rules_pass(sel)
    return (
        frame.with_columns(expr.fill_null(False).alias("_text_rules_pass"))
        .get_column("_text_rules_pass")
        .cast(pl.Boolean)
    )


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
    # a row without a URL is never fetched and never will be: missing_url, not "rerun to score it"
    return expr & missing_url_fails().not_()


def clip_fails(threshold: float | None) -> pl.Expr:
    if threshold is None:
        return _FALSE
    return (pl.col(schema.CLIP_SCORE) < threshold).fill_null(False)


def rule_failures(sel: SelectionConfig, clip_threshold: float | None) -> dict[Reason, pl.Expr]:
    """Every pre-dedup rule's failure expression, in RULE_ORDER."""
    return {
        Reason.MISSING_URL: missing_url_fails(),
        Reason.LANGUAGE: language_fails(sel.language),
        Reason.CAPTION_LENGTH: caption_fails(sel.caption),
        Reason.FETCH_FAILED: fetch_fails(),
        Reason.OPT_OUT: opt_out_fails(),
        Reason.IMAGE_SIZE: image_fails(sel.image),
        Reason.NOT_SCORED: not_scored(sel, clip_threshold is not None),
        Reason.CLIP_SCORE: clip_fails(clip_threshold),
    }
