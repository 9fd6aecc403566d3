"""Column names, statuses and removal reasons: the vocabulary every stage shares.

One place for these strings, so a stage, a filter and a report can never disagree on a spelling.
"""

from __future__ import annotations

from enum import Enum

# --- identity columns (present on every row from the read stage on) -----------------------------
UID = "uid"  # 32 hex chars: the input's own uid, or md5(url \x00 caption) (DataComp-style, 128 bit)
URL = "url"
CAPTION = "caption"
SHARD = "shard"  # the input shard's stem, e.g. "part-00003"; annotations/<shard>.parquet holds its rows
ROW = "row"  # 0-based row index inside the input shard; (shard, row) is the row's key

# --- annotation columns ---------------------------------------------------------------------------
LANGUAGE = "language"
LANGUAGE_SCORE = "language_score"
CAPTION_CHARS = "caption_chars"
CAPTION_WORDS = "caption_words"
DOMAIN = "domain"  # registered domain (public suffix list), e.g. "wp.com", "bbc.co.uk"
TLD = "tld"  # public suffix, e.g. "com", "co.uk"
URL_NORMALIZED = "url_normalized"

FETCH_STATUS = "fetch_status"
FETCH_ERROR = "fetch_error"
WIDTH = "width"  # of the stored (possibly downscaled) image
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"  # of the image as served, or from input metadata
ORIGINAL_HEIGHT = "original_height"
IMAGE_SHA256 = "image_sha256"  # sha256 of the bytes as served
EXPECTED_SHA256 = "sha256"  # the input's own sha256 of the image (DataComp); a mismatch is hash_mismatch

CLIP_SCORE = "clip_score"
CLIP_MODEL = "clip_model"  # "<architecture>/<pretrained tag or checkpoint name>"

# --- selection columns ----------------------------------------------------------------------------
KEPT = "kept"
REASON = "reason"  # first failing rule, in RULE_ORDER (filters/rules.py); null when kept
REASONS = "reasons"  # every failing rule, in RULE_ORDER
DUPLICATE_OF = "duplicate_of"  # uid of the surviving copy, for duplicate removals
# a duplicate group's id (its survivor's uid), on every removed copy AND on the kept survivor,
# so that one filter on it lists the whole group; null for rows with no duplicate
DUPLICATE_CLUSTER = "duplicate_cluster"
CAPTION_LSH = "caption_lsh"  # list<uint64>: LSH band keys of the caption's MinHash (curate/stages/caption_minhash.py)
CAPTION_LSH_NGRAM = "caption_lsh_ngram"  # the shingle size those keys were built with (annotate.caption_ngram)

IMAGE_EMBEDDING = "image_embedding"  # list<float16>, L2-normalised; embeddings/<shard>.parquet (score.store_embeddings)
IMAGE_PHASH = "image_phash"  # uint64 perceptual hash (imagehash pHash); embeddings/<shard>.parquet

IMAGE_BYTES = "jpg"  # column of the per-shard image cache written by the fetch stage

# selection.concepts (curate/concepts.py): a rule family, one reason and one score column per concept
CONCEPT = "concept"


def concept_reason(name: str) -> str:
    """The removal reason of concept `name`: concept:<name>."""
    return f"{CONCEPT}:{name}"


def concept_column(name: str) -> str:
    """The score column of concept `name` (float32; null for a row without an image embedding)."""
    return f"{CONCEPT}_{name}"


class FetchStatus(str, Enum):
    """Outcome of fetching one row's image. Every row has exactly one."""

    OK = "ok"
    NOT_ATTEMPTED = "not_attempted"  # removed by a cheap text rule before fetching
    NOT_NEEDED = "not_needed"  # the spec scores from an input column; no image is fetched
    DOWNLOAD_FAILED = "download_failed"  # HTTP error, timeout, refused connection, ...
    DECODE_FAILED = "decode_failed"  # bytes arrived but are not a decodable image
    LOST = "lost"  # the fetcher returned no record for the row (reported loudly)
    # finer outcomes of curate's own fetch layer (curate/fetching/, docs/FETCH.md); the two above
    # (download_failed, decode_failed) stay for older annotations and for the scorer's decode check
    BAD_URL = "bad_url"  # empty, unparsable, or not http(s)
    BLOCKED_ADDRESS = "blocked_address"  # resolves to / redirects to an address the SSRF policy refuses
    CONNECTION_ERROR = "connection_error"  # DNS failure, refused, reset (transient)
    TIMEOUT = "timeout"  # socket timeout or the per-URL total deadline (transient)
    HTTP_4XX = "http_4xx"  # a 4xx answer other than 408/429 (permanent)
    HTTP_5XX = "http_5xx"  # a 5xx answer (transient)
    RATE_LIMITED = "rate_limited"  # 429, or a 503 / domain backoff longer than the deadline allows (transient)
    TOO_MANY_REDIRECTS = "too_many_redirects"  # more than fetch.max_redirects hops, or a bad Location
    TOO_LARGE = "too_large"  # the response is longer than fetch.max_bytes
    OPT_OUT = "opt_out"  # an X-Robots-Tag directive excludes the image (not a failure: reason opt_out)
    BAD_FORMAT = "bad_format"  # magic bytes are not an allow-listed image format (HTML, SVG, ...)
    TOO_MANY_PIXELS = "too_many_pixels"  # header says more than fetch.max_pixels: a decompression bomb
    DECODE_ERROR = "decode_error"  # allow-listed format, but truncated or corrupt
    HASH_MISMATCH = "hash_mismatch"  # the input's sha256 column disagrees with the bytes served
    INTERNAL_ERROR = "internal_error"  # an unexpected exception for this URL (traceback in fetch_error)


# Removal reasons, their order and help text are declared with the rules: filters/rules.py (RULES).
