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
REASON = "reason"  # first failing rule, in RULE_ORDER; null when kept
REASONS = "reasons"  # every failing rule, in RULE_ORDER
DUPLICATE_OF = "duplicate_of"  # uid of the surviving copy, for duplicate removals
# a duplicate group's id (its survivor's uid), on every removed copy AND on the kept survivor,
# so that one filter on it lists the whole group; null for rows with no duplicate
DUPLICATE_CLUSTER = "duplicate_cluster"
CAPTION_LSH = "caption_lsh"  # list<uint64>: LSH band keys of the caption's MinHash (curate/stages/caption_minhash.py)

IMAGE_EMBEDDING = "image_embedding"  # list<float16>, L2-normalised; embeddings/<shard>.parquet (score.store_embeddings)
IMAGE_PHASH = "image_phash"  # uint64 perceptual hash (imagehash pHash); embeddings/<shard>.parquet

IMAGE_BYTES = "jpg"  # column of the per-shard image cache written by the fetch stage


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


class Reason(str, Enum):
    """Why a row was removed. The order of RULE_ORDER is the order rules are checked in."""

    MISSING_URL = "missing_url"
    FETCH_FAILED = "fetch_failed"
    OPT_OUT = "opt_out"
    LANGUAGE = "language"
    CAPTION_LENGTH = "caption_length"
    IMAGE_SIZE = "image_size"
    NOT_SCORED = "not_scored"
    CLIP_SCORE = "clip_score"
    DUPLICATE_URL = "duplicate_url"
    DUPLICATE_IMAGE = "duplicate_image"
    DUPLICATE_CAPTION = "duplicate_caption"
    DUPLICATE_IMAGE_NEAR = "duplicate_image_near"
    DUPLICATE_UID = "duplicate_uid"


# A row without a URL first (there is nothing to fetch, deduplicate or deliver), then the text
# rules (they decide what is worth fetching), then what the fetch tells us, then the model's
# score, then dedup last: a duplicate's survivor is chosen among copies that pass every other
# rule, so dedup must see the outcome of all of them. duplicate_uid is the very last step: of what
# every other rule and dedup left, one row per uid is kept, so uids.npy has one entry per kept row.
RULE_ORDER: tuple[Reason, ...] = (
    Reason.MISSING_URL,
    Reason.LANGUAGE,
    Reason.CAPTION_LENGTH,
    Reason.FETCH_FAILED,
    Reason.OPT_OUT,
    Reason.IMAGE_SIZE,
    Reason.NOT_SCORED,
    Reason.CLIP_SCORE,
    Reason.DUPLICATE_URL,
    Reason.DUPLICATE_IMAGE,
    Reason.DUPLICATE_CAPTION,
    Reason.DUPLICATE_IMAGE_NEAR,
    Reason.DUPLICATE_UID,
)

REASON_HELP: dict[Reason, str] = {
    Reason.MISSING_URL: "the row has no URL (null, empty or blank): nothing to fetch, deduplicate or deliver",
    Reason.LANGUAGE: "caption language not in the allow-list, or detected with too little confidence",
    Reason.CAPTION_LENGTH: "caption too short or too long (words or characters)",
    Reason.FETCH_FAILED: "image could not be downloaded or decoded (see fetch_status / fetch_error)",
    Reason.OPT_OUT: "the server opted the image out of AI use (X-Robots-Tag noai / noimageai / our user agent's token)",
    Reason.IMAGE_SIZE: "image smaller than the minimum side, or aspect ratio too extreme",
    Reason.NOT_SCORED: "row has no CLIP score because an earlier, stricter run skipped it; rerun to score it",
    Reason.CLIP_SCORE: "image-text similarity below the threshold",
    Reason.DUPLICATE_URL: "another row has the same normalised URL; duplicate_of names the survivor",
    Reason.DUPLICATE_IMAGE: "another row has the same image bytes (sha256); duplicate_of names the survivor",
    Reason.DUPLICATE_CAPTION: "another row's caption is a near-duplicate (MinHash LSH, word n-gram Jaccard >= dedup.caption_jaccard); duplicate_of names the survivor",
    Reason.DUPLICATE_IMAGE_NEAR: "another row's image is a near-duplicate (CLIP image embedding cosine >= dedup.image_cosine within a k-means cluster); duplicate_of names the survivor",
    Reason.DUPLICATE_UID: "another kept row has the same uid (a repeated input row or uid); duplicate_of names the survivor, so kept uids are unique",
}
