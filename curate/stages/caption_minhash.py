"""Caption MinHash signatures and LSH band keys, computed per shard as an annotation.

The selection step (curate.filters.caption_dedup) turns the band keys into near-duplicate
clusters globally; this module only does the per-row, embarrassingly parallel part.

Shingles. A caption is normalised (NFKC, lower case) and split into tokens: a run of word
characters is one token, except that every CJK character (Han, Hiragana, Katakana, Hangul) is a
token of its own, so word n-grams of a CJK caption are character n-grams (there are no spaces to
split words on). The shingles are the caption's token n-grams (default n = 2, see docs/DEDUP.md for
why not 3); a caption with fewer than n tokens has one shingle, its whole token sequence. A caption
with no token at all has no signature (null): it is never a near-duplicate.

Hashing, vectorised. Each distinct token is hashed once (blake2b, 64 bit: stable across processes,
machines and library versions, unlike Python's hash() or polars' hash()); an n-gram's hash is a
numpy combination of its token hashes, folded to 32 bit. The signature is exactly datasketch's
MinHash (scheme affine32, its `permutations` a/b for the given seed, its 32-bit murmur finaliser
`_fmix`) over those 32-bit shingle hashes -- tests check it equals `MinHash.update` value for value
-- but computed as one numpy broadcast per chunk of shingles and a `np.minimum.reduceat` per row,
never a Python loop per shingle or per permutation.

Band keys. The signature's first b*r values are cut into b bands of r rows; each band is mixed into
one uint64 key (band index included, so equal values in different bands never collide). Only the b
keys are stored (annotation column `caption_lsh`, list<uint64>): two rows are LSH candidates iff
they share a key, so the global step is a group-by on the exploded keys.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import polars as pl
import pyarrow as pa

from curate import schema

CAPTION_LSH = schema.CAPTION_LSH  # annotation column: list<uint64>, b band keys, null without tokens

DEFAULT_NGRAM = 2
DEFAULT_NUM_PERM = 128
DEFAULT_THRESHOLD = 0.8
SEED = 1  # datasketch's default seed: the permutations are MinHash(num_perm, seed=1)'s
# Candidates are verified on exact Jaccard in selection, so a false candidate costs a little
# compute while a missed one is lost for good: weight false negatives 9:1 when tuning the bands.
FP_WEIGHT, FN_WEIGHT = 0.1, 0.9
# Without verification (selection.dedup.caption_verify = false) every candidate pair is merged, so
# the bands alone decide precision, and recall-tuned bands merge dissimilar pairs: 32 bands x 8
# rows (threshold 0.7, 256 permutations) make a pair at Jaccard 0.51 a candidate 13.7% of the time.
# A spec may switch verification off only when its bands make a pair UNVERIFIED_MARGIN below
# dedup.caption_jaccard a candidate with probability <= UNVERIFIED_MAX_FP (PipelineSpec checks it).
UNVERIFIED_MARGIN = 0.2
UNVERIFIED_MAX_FP = 0.01

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
TOKEN_PATTERN = rf"[{_CJK}]|[\w--[{_CJK}]]+"

_M64 = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float = DEFAULT_THRESHOLD, num_perm: int = DEFAULT_NUM_PERM) -> tuple[int, int]:
    """(bands, rows) for a Jaccard threshold: datasketch's own optimiser (the one MinHashLSH uses),
    weighted towards recall because every candidate is verified afterwards."""
    # lazy: datasketch pulls scipy (~0.5 s); `curate select` imports this module (shingle_hashes), never MinHash
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, FP_WEIGHT, FN_WEIGHT)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(two captions whose shingle sets have this Jaccard share a band key): the LSH S-curve
    1 - (1 - s^r)^b (each MinHash value agrees with probability s; a band agrees when all r do)."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def unverified_bands_problem(caption_jaccard: float, threshold: float, num_perm: int) -> str | None:
    """Why the bands of (annotate.caption_minhash_threshold, caption_minhash_perm) are not precise
    enough to merge candidates unverified at dedup.caption_jaccard, with what to set instead; None
    when P(candidate | J = caption_jaccard - UNVERIFIED_MARGIN) <= UNVERIFIED_MAX_FP."""
    j0 = max(0.0, caption_jaccard - UNVERIFIED_MARGIN)
    b, r = lsh_params(threshold, num_perm)
    p = candidate_probability(j0, b, r)
    if p <= UNVERIFIED_MAX_FP:
        return None

    def ok(i: int) -> bool:
        return candidate_probability(j0, *lsh_params(i / 100, num_perm)) <= UNVERIFIED_MAX_FP

    # the smallest threshold on a 0.01 grid whose bands meet the bound: bisection (the S-curve
    # steepens as the threshold rises), then checked, and scanned upward if the curve was not monotone
    lo, hi = int(threshold * 100) + 1, 99
    suggestion = None
    if lo <= hi and ok(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        suggestion = next(i for i in range(lo, 100) if ok(i))
    msg = (
        f"selection.dedup.caption_verify = false merges every MinHash LSH candidate pair without checking its "
        f"Jaccard, but the band keys of annotate.caption_minhash_threshold = {threshold:g} with caption_minhash_perm = "
        f"{num_perm} ({b} bands x {r} rows, tuned for recall because candidates are normally verified) make a pair at "
        f"Jaccard {j0:.2f} (dedup.caption_jaccard {caption_jaccard:g} - {UNVERIFIED_MARGIN:g}) a candidate with "
        f"probability {p:.1%}; unverified merging needs at most {UNVERIFIED_MAX_FP:.0%} (1 - (1 - s^r)^b). "
        "Set selection.dedup.caption_verify = true (recommended: exact Jaccard of every candidate pair)"
    )
    if suggestion is None:
        return msg + f"; no annotate.caption_minhash_threshold < 1 meets the bound with {num_perm} permutations."
    t = suggestion / 100
    sb, sr = lsh_params(t, num_perm)
    return msg + (
        f", or annotate.caption_minhash_threshold = {t:g} ({sb} bands x {sr} rows: {candidate_probability(j0, sb, sr):.2%} "
        f"at Jaccard {j0:.2f}; it finds {candidate_probability(caption_jaccard, sb, sr):.0%} of pairs at Jaccard "
        f"{caption_jaccard:g}) and annotate again into a fresh output.dir (band keys are computed by curate run)."
    )


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int = DEFAULT_NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    # lazy: datasketch pulls scipy (~0.5 s); `curate select` imports this module (shingle_hashes), never MinHash
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _token_hashes(tokens: pl.Series) -> np.ndarray:
    """blake2b-64 of each token (each distinct token hashed once)."""
    uniq = tokens.unique()
    hs = np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in uniq.to_list()),
        dtype=np.uint64,
        count=uniq.len(),
    )
    lut = pl.DataFrame({"t": uniq, "h": pl.Series(hs, dtype=pl.UInt64)})
    return pl.DataFrame({"t": tokens}).join(lut, on="t", how="left", maintain_order="left").get_column("h").to_numpy()


def shingle_hashes(captions: pl.Series | list, ngram: int = DEFAULT_NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """(row, hash) for every shingle of every caption, rows ascending; hash is the uint32 value
    fed to MinHash. Captions without a token contribute no row."""
    if ngram < 1:
        raise ValueError("ngram must be >= 1")
    caps = pl.Series("c", captions, dtype=pl.String) if not isinstance(captions, pl.Series) else captions.rename("c")
    toks = (
        pl.DataFrame({"c": caps})
        .with_row_index("r")
        .select("r", pl.col("c").str.normalize("NFKC").str.to_lowercase().str.extract_all(TOKEN_PATTERN).alias("t"))
        .with_columns(pl.col("t").list.len().alias("n"))
        .filter(pl.col("n") > 0)
        .explode("t")
    )
    if toks.height == 0:
        return np.empty(0, np.int64), np.empty(0, np.uint32)
    row = toks.get_column("r").to_numpy().astype(np.int64)
    length = toks.get_column("n").to_numpy().astype(np.int64)
    th = _token_hashes(toks.get_column("t"))
    # position of each token within its caption
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    pos = np.arange(row.size) - np.repeat(starts, np.diff(np.r_[starts, row.size]))
    h = th.copy()
    for k in range(1, ngram):
        nxt = np.zeros_like(th)
        nxt[:-k] = th[k:]
        valid = pos + k < length  # the k-th next token belongs to the same caption
        h = np.where(valid, _fmix64(h * _M64 + nxt + np.uint64(k)), h)
    first = (pos + ngram <= length) | ((pos == 0) & (length < ngram))
    h64 = h[first]
    h32 = ((h64 ^ (h64 >> np.uint64(32))) & _MASK32).astype(np.uint32)
    return row[first], h32


def _fmix32(h: np.ndarray) -> np.ndarray:
    # lazy: datasketch pulls scipy (~0.5 s); `curate select` imports this module (shingle_hashes), never MinHash
    from datasketch.minhash import _fmix

    return _fmix(h, 32)


def signatures(
    captions: pl.Series | list, num_perm: int = DEFAULT_NUM_PERM, ngram: int = DEFAULT_NGRAM, chunk: int = 1 << 15
) -> tuple[np.ndarray, np.ndarray]:
    """(signature matrix (n, num_perm) uint32, has_signature (n,) bool). Rows without a token keep
    the all-max signature and has_signature False."""
    n = len(captions)
    a, b = permutations(num_perm)
    sig = np.full((n, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    rows, hv = shingle_hashes(captions, ngram)
    if rows.size == 0:
        return sig, np.zeros(n, bool)
    hv = _fmix32(hv)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    present = rows[starts]
    # chunks of whole rows, about `chunk` shingles each: (chunk, num_perm) uint32 at a time
    bounds = np.searchsorted(starts, np.arange(0, rows.size, chunk), side="right") - 1
    cuts = np.unique(np.r_[starts[bounds], rows.size])
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        # (num_perm, shingles): uint32 wraps, a*h+b mod 2^32, as datasketch's affine32; the
        # per-row minimum runs along contiguous memory (2x faster than the transposed layout)
        phv = a[:, None] * hv[None, lo:hi] + b[:, None]
        s = starts[(starts >= lo) & (starts < hi)]
        sig[rows[s]] = np.minimum.reduceat(phv, s - lo, axis=1).T
    has = np.zeros(n, bool)
    has[present] = True
    return sig, has


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: each band of `rows` signature values mixed into one key."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, have {sig.shape[1]}")
    v = sig[:, : bands * rows].reshape(sig.shape[0], bands, rows).astype(np.uint64)
    h = np.broadcast_to(_fmix64(np.arange(1, bands + 1, dtype=np.uint64) * _M64), v.shape[:2]).copy()
    for j in range(rows):
        h = _fmix64((h ^ v[:, :, j]) * _M64 + np.uint64(j))
    return h


def caption_lsh(
    captions: pl.Series | list,
    threshold: float = DEFAULT_THRESHOLD,
    num_perm: int = DEFAULT_NUM_PERM,
    ngram: int = DEFAULT_NGRAM,
) -> pa.Array:
    """The `caption_lsh` annotation for a shard's captions: list<uint64> of band keys, or null."""
    b, r = lsh_params(threshold, num_perm)
    sig, has = signatures(captions, num_perm, ngram)
    keys = band_keys(sig, b, r)
    offsets = np.arange(0, (len(captions) + 1) * b, b, dtype=np.int32)
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(keys.reshape(-1), pa.uint64()), mask=pa.array(~has))
    return arr


def annotate_caption_lsh(ann: pl.DataFrame, threshold: float, num_perm: int, ngram: int) -> pl.DataFrame:
    """Add the caption_lsh column to an annotation frame (the call prepare_shard makes), and the
    shingle size beside it (caption_lsh_ngram): selection verifies candidates with the same size."""
    col = caption_lsh(ann.get_column("caption").fill_null(""), threshold, num_perm, ngram)
    return ann.with_columns(pl.from_arrow(col).alias(CAPTION_LSH)).with_columns(
        pl.when(pl.col(CAPTION_LSH).is_not_null()).then(pl.lit(ngram, pl.Int8)).alias(schema.CAPTION_LSH_NGRAM)
    )
