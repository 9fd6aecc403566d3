"""What a selection writes for each input shard, and the uid file's format: one definition for the
in-process writer (curate/selection.py) and the per-block tasks of the Ray engine
(curate/distributed_selection.py).

    kept/<shard>.parquet      the retained pairs (every annotation column)
    removed/<shard>.parquet   the removed pairs, with reason, reasons, duplicate_of
                              (selection.write = "kept": the decision columns only)
    decisions/<shard>.parquet selection.write = "decisions": DECISION_COLUMNS of every row, instead
                              of kept/ and removed/
    uids.npy                  sorted kept uids as DataComp's (u8, u8) pairs
"""

from __future__ import annotations

import io as _io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import polars as pl

from curate import io, schema
from curate.executor import Future

DROP_FROM_OUTPUTS = (schema.URL_NORMALIZED,)
# what selection.write = "decisions" writes for every row (and "kept" for the removed ones)
DECISION_COLUMNS = [
    schema.SHARD,
    schema.ROW,
    schema.UID,
    schema.KEPT,
    schema.REASON,
    schema.REASONS,
    schema.DUPLICATE_OF,
    schema.DUPLICATE_CLUSTER,
]
UID_DTYPE = np.dtype("u8,u8")


Digests = dict[str, dict[str, Any]]  # file path relative to the selection folder -> {bytes, sha256}


def write_shard(out: str, shard: str, part: pl.DataFrame, write: str) -> tuple[dict[str, int], Digests]:
    """Write one shard's decided rows (`part`: annotation columns + decision columns) as
    selection.write asks; returns its counts {rows, kept, removed} and the files' digests (hashed
    as they were written, by whichever process wrote them: the run manifest records them without
    the driver reading the files again)."""
    part = part.drop(DROP_FROM_OUTPUTS, strict=False).sort(schema.ROW)
    n_kept = int(part.get_column(schema.KEPT).sum())
    if write == "decisions":
        frames = {f"decisions/{shard}.parquet": part.select(DECISION_COLUMNS)}
    else:
        kept = part.filter(pl.col(schema.KEPT)).drop(schema.REASON, schema.REASONS, schema.DUPLICATE_OF)
        removed = part.filter(pl.col(schema.KEPT).not_())
        if write == "kept":
            removed = removed.select(DECISION_COLUMNS)
        frames = {f"kept/{shard}.parquet": kept, f"removed/{shard}.parquet": removed}
    digests = {rel: io.write_parquet(io.join(out, rel), f.to_arrow()) for rel, f in frames.items()}
    return {"rows": part.height, "kept": n_kept, "removed": part.height - n_kept}, digests


def uid_halves(uids: Sequence[str] | pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(high u64, low u64) of each uid (32 hex digits); a uid of another shape is a ValueError
    naming it."""
    s = uids if isinstance(uids, pl.Series) else pl.Series("uid", list(uids), dtype=pl.String)
    bad = s.filter(~s.str.contains(r"^[0-9a-fA-F]{32}$").fill_null(False))
    if bad.len():
        raise ValueError(f"uid {bad[0]!r} is not 32 hex digits: uids.npy (DataComp's format) cannot hold it")
    hi = s.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy()
    lo = s.str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy()
    return hi, lo


def sorted_pairs(hi: np.ndarray, lo: np.ndarray, unique: bool = True) -> np.ndarray:
    """The pairs sorted as DataComp's uid file holds them; repeats dropped (unique=True) or an error."""
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    first = np.ones(len(hi), dtype=bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    if not unique and not first.all():
        k = int(np.flatnonzero(~first)[0])
        raise RuntimeError(
            f"kept uid {int(hi[k]):016x}{int(lo[k]):016x} is repeated: uids.npy would not match the kept rows"
        )
    out = np.empty(int(first.sum()), dtype=UID_DTYPE)
    out["f0"], out["f1"] = hi[first], lo[first]
    return out


def uid_range(hi: np.ndarray, ranges: int) -> np.ndarray:
    """Which of `ranges` equal slices of the uid space each high half falls in (monotone in hi:
    the sorted ranges, one after another, are the sorted file)."""
    return ((hi >> np.uint64(32)) * np.uint64(ranges) >> np.uint64(32)).astype(np.int64)


def npy_header(n: int) -> bytes:
    """The .npy header np.save writes for n pairs: a file streamed as header + sorted ranges is
    byte for byte np.save's."""
    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def write_uids(path: str, n: int, ranges: Iterable[np.ndarray]) -> dict[str, Any]:
    """uids.npy of n pairs from sorted, consecutive ranges, streamed (one range in memory). A
    count that does not come out at n fails the write: the old file stays. Returns {bytes, sha256}."""

    def chunks():
        yield npy_header(n)
        written = 0
        for r in ranges:
            written += len(r)
            yield r.tobytes()
        if written != n:
            raise RuntimeError(f"{path}: {written} uids streamed, {n} expected")

    return io.atomic_write_chunks(path, chunks())


def write_uids_fetched(path: str, n: int, ranges: list[Future]) -> dict[str, Any]:
    """write_uids of the ranges' futures, fetched one at a time: run as a task (the Ray engine),
    the ranges go from the object store to this task, never through the driver, whose memory
    would keep every page of them it touched (docs/SCALE.md)."""
    return write_uids(path, n, (f.fetch() for f in ranges))
