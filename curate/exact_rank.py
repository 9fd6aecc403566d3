"""The exact k-th largest value of a column spread over many shards, without gathering the column:
a radix select over order-preserving 64-bit keys, in a few passes of sparse per-shard counts.

What it is for: DataComp's top fraction (`clip.top_fraction`: n = int(N * f), the threshold is the
(n+1)-th highest score of the scored pool, ties kept) on pools no machine holds. Each pass, every
shard counts its values by the next `width` bits of their keys (among the values whose higher bits
match the prefix chosen so far) and returns only the occupied bins; the driver adds the counts,
walks them from the top to the bin that holds the k-th value, and narrows the prefix. After the
passes of PASS_BITS (24 + 24 + 16 = all 64 bits) the prefix is the key of the k-th value itself:
exact, bit for bit what sorting the whole column gives, never an approximation.

Costs: each pass reads the one column of every shard once (a shard task); a shard's answer is
at most 2^24 bins and in practice a few thousand (CLIP cosines span a few binary exponents), the
driver holds one merged pass at a time: O(occupied bins), never O(rows).

Keys: a float64 maps to a uint64 that sorts like the float (sign bit flipped for positives, all
bits flipped for negatives); -0.0 is counted as +0.0 (they compare equal, so either gives the
same kept set, and one answer is chosen); NaN has no rank and must be left out by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

PASS_BITS = (24, 24, 16)  # bits of the 64-bit key resolved by each pass
_SIGN = np.uint64(1 << 63)

Counts = tuple[np.ndarray, np.ndarray]  # (bins uint64 ascending, counts int64), occupied bins only


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the float64 `values` (no NaN); -0.0 gets +0.0's key."""
    v = np.asarray(values, dtype=np.float64) + 0.0  # -0.0 + 0.0 == +0.0
    if np.isnan(v).any():
        raise ValueError("order_keys: NaN has no rank; leave it out first")
    bits = v.view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float64 whose order key is `key` (order_keys' inverse)."""
    k = np.uint64(key)
    bits = k & ~_SIGN if k & _SIGN else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def pass_counts(keys: np.ndarray, prefix: int, done: int, width: int) -> Counts:
    """Counts of `keys` whose top `done` bits equal `prefix`, by their next `width` bits."""
    keys = np.asarray(keys, dtype=np.uint64)
    if done:
        keys = keys[(keys >> np.uint64(64 - done)) == np.uint64(prefix)]
    shift = np.uint64(64 - done - width)
    bins = (keys >> shift) & np.uint64((1 << width) - 1)
    b, c = np.unique(bins, return_counts=True)
    return b.astype(np.uint64), c.astype(np.int64)


def merge(parts: Iterable[Counts]) -> Counts:
    """The sum of sparse counts (bins may repeat across parts)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    bins = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    b, inv = np.unique(bins, return_inverse=True)
    return b, np.bincount(inv, weights=counts, minlength=len(b)).astype(np.int64)


def pick(counts: Counts, k: int) -> tuple[int, int]:
    """(bin, rank within it) of the k-th largest (0-based) among the counted values."""
    bins, c = counts
    above = 0
    for i in range(len(bins) - 1, -1, -1):  # descending: at most the occupied bins
        if above + int(c[i]) > k:
            return int(bins[i]), k - above
        above += int(c[i])
    raise ValueError(f"rank {k} is beyond the {above} value(s) counted")


CountPass = Callable[[int, int, int], Iterable[Counts]]  # (prefix, done, width) -> each shard's counts


def total(count_pass: CountPass) -> tuple[int, Counts]:
    """(number of values, the first pass's merged counts): the first pass gives N for free."""
    first = merge(count_pass(0, 0, PASS_BITS[0]))
    return int(first[1].sum()), first


def kth_largest(count_pass: CountPass, k: int, first: Counts | None = None) -> float:
    """The exact k-th largest value (0-based: k = 0 is the maximum) of the values `count_pass`
    counts, in len(PASS_BITS) passes (`first`: the first pass's merged counts when the caller
    already has them, from `total`)."""
    if k < 0:
        raise ValueError(f"rank {k} < 0")
    prefix, done = 0, 0
    for i, width in enumerate(PASS_BITS):
        counts = first if (i == 0 and first is not None) else merge(count_pass(prefix, done, width))
        b, k = pick(counts, k)
        prefix, done = (prefix << width) | b, done + width
    return key_value(prefix)


def top_fraction_index(n_pool: int, fraction: float) -> int:
    """DataComp's --fraction: the 0-based rank, in descending order, of the threshold value (the
    same expression as the in-process engine, filters/decide.py)."""
    return min(int(n_pool * fraction), n_pool - 1)
