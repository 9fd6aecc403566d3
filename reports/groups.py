"""The report's per-group tables: every value of a grouping column (domain, TLD, language, ...)
with its counts, removal rate, Wilson interval, the rate of the rest of the rows, the two-proportion
p-value, the Benjamini-Hochberg q-value and the flag; and what the report shows of them: the
largest `top` groups, up to `top` more flagged ones (most significant first), and a rollup of all
the others (curate/reports/summary.py turns them into the report's rows).

A grouping can have millions of values (domains at LAION scale: ~10^7, ~0.4 KB each in the table),
so the table is never gathered in one process. It is computed in parts (sources.py `partitioned`:
a hash of the value picks the part, so each value's counts are complete in one part), by tasks, in
rounds; the driver holds a few small answers per part, never a table:

  prepare  per part: its rows in the table's order (rows_in descending, then value, nulls last);
           rate, Wilson interval, the rest-of-rows rate and the p-value (group vs the rest, from the
           report's totals); answers how many p-values it has and a histogram of them (the top
           HIST_BITS bits of their order keys, curate/exact_rank.py: at most 2^16 bins).
  split    per part: its distinct p-values (each with how often it occurs) cut into ranges of value
           at splitters chosen from the merged histogram (about equal counts per range).
  scan     per range of p-values: every part's piece; a p-value's BH rank is the count of p-values
           up to it (those of the ranges below come from the histogram), BH's p m / rank, and its
           minimum from each value up within the range; each part gets its own values' minima back.
  finish   per part: q = min(1, that minimum, the minimum of every range above). That is BH's
           q-value of p (benjamini_hochberg below, over all the groups at once: the minimum over
           every p' >= p of p' m / rank(p'), a minimum of the same float products and quotients),
           bit for bit, for every group. The flag and direction; its rows stay where they are (a
           future: GroupTable, written by a task), and it answers its first `top` rows, its first
           2 top flagged rows by (q, table order), the sums of its counts, its numbers of groups and
           its first group whose counts do not add up.
  merge    driver: the shown groups (the largest `top` of all parts' first rows; then the flagged
           outside them by (q, table order): a part holds at most `top` of the largest, so its
           first 2 top flagged hold every one it can contribute) and the rollup (the sums of every
           part minus the shown groups).

The local engine runs the same rounds, on one part, in this process (sources.FrameSource): both
engines show the same groups with the same numbers, flags and q-values.

On disk (GroupTable.write) a table is a set of parquet parts written by the tasks that hold them:
tables/<name>.<generation>.part-<i>-of-<n>.parquet, each part in the table's order (the whole
table: sort by rows_in descending, then value). A reader takes the newest complete generation
(table_files / read_table): a rewrite in place (curate report) writes a new generation beside the
old one and then deletes the old, so a reader sees one whole table, never parts of two.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate import exact_rank, io
from curate.executor import Executor, Future
from curate.reports.sources import TASK, Parts, _in_values, part_index

VALUE = "value"  # the grouping column's name in a group table
Z95 = 1.959963984540054  # two-sided 95% normal quantile
HIST_BITS = 16  # bits of a p-value's order key that the splitters of the ranges are chosen from
_SHIFT = np.uint64(64 - HIST_BITS)


# --------------------------------------------------------------------------------------------------
# statistics (numpy arrays or scalars)


def wilson_bounds(successes, n, z: float = Z95):
    """Wilson score interval (lo, hi) for binomial proportions successes/n: numpy arrays or
    scalars (NaN where n == 0). The one implementation; summary.wilson_interval is its scalar form."""
    x, n = np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        z2 = z * z
        denom = 1.0 + z2 / n
        centre = (p + z2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)


def two_proportion_p(x1, n1, x2, n2):
    """Two-sided p-values of the pooled two-proportion z-test, x1/n1 vs x2/n2 (numpy arrays or
    scalars). NaN where a side is empty; 1.0 where the pooled rate is 0 or 1 (nothing differs)."""
    x1, n1, x2, n2 = (np.asarray(a, dtype=np.float64) for a in (x1, n1, x2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (x1 + x2) / (n1 + n2)
        se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        z = np.abs(x1 / n1 - x2 / n2) / se
    erfc = np.frompyfunc(math.erfc, 1, 1)
    p = np.where(np.isfinite(z), erfc(np.nan_to_num(z) / math.sqrt(2)).astype(np.float64), 1.0)
    return np.where((n1 > 0) & (n2 > 0), p, np.nan)


def benjamini_hochberg(p):
    """Benjamini-Hochberg adjusted p-values (q-values) of all of `p` at once; NaN in, NaN out (not
    counted as a test). The reference the rounds above reproduce, part by part."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


# --------------------------------------------------------------------------------------------------
# the rounds' tasks


@dataclass(frozen=True)
class Setup:
    """What every part of every grouping is computed with."""

    counts: tuple[str, ...]  # rows_in, kept, removed, then one r:<reason> column per rule
    extra: tuple[str, ...]  # a:<rule> and o:<rule> columns (summed in the rollup)
    tot_n: int  # rows in, all groups
    tot_x: int  # rows removed, all groups
    min_group_size: int
    alpha: float
    top: int

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.counts[3:]


def table_order(df: pl.DataFrame) -> pl.DataFrame:
    """A group table's order: rows_in descending, then value (nulls last)."""
    return df.sort(["rows_in", VALUE], descending=[True, False], nulls_last=True)


def _by_q(df: pl.DataFrame) -> pl.DataFrame:
    """Flagged groups, most significant first; groups that tie on q in the table's order."""
    return df.sort(["q_value", "rows_in", VALUE], descending=[False, True, False], nulls_last=True)


def _prepare(counts: pl.DataFrame, key: str, s: Setup) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One part's rows with everything but the q-value; (the rows, {m, hist}) (a task)."""
    df = counts.rename({key: VALUE}) if key != VALUE else counts
    df = table_order(df.with_columns(pl.col(c).fill_null(0) for c in (*s.counts[1:], *s.extra)))
    n1 = df["rows_in"].to_numpy().astype(np.float64)
    x1 = df["removed"].to_numpy().astype(np.float64)
    n2, x2 = np.float64(s.tot_n) - n1, np.float64(s.tot_x) - x1
    tested = n1 >= s.min_group_size
    p = np.where(tested, two_proportion_p(x1, n1, x2, n2), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = x1 / n1
        rest = np.where(n2 > 0, x2 / n2, np.nan)
    ci_lo, ci_hi = wilson_bounds(x1, n1)
    df = df.with_columns(
        pl.Series("removal_rate", rate, dtype=pl.Float64).fill_nan(None),
        pl.Series("ci_lo", ci_lo, dtype=pl.Float64).fill_nan(None),
        pl.Series("ci_hi", ci_hi, dtype=pl.Float64).fill_nan(None),
        pl.Series("rest_rate", rest, dtype=pl.Float64).fill_nan(None),
        pl.Series("p_value", p, dtype=pl.Float64).fill_nan(None),
    )
    b, c = np.unique(exact_rank.order_keys(p[~np.isnan(p)]) >> _SHIFT, return_counts=True)
    return df, {"m": int(c.sum()), "hist": (b.astype(np.uint64), c.astype(np.int64))}


def _distinct_p(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A part's p-values: (the distinct ones ascending, how often each occurs, each row's index
    into them; rows without a p-value left out)."""
    p = rows["p_value"].drop_nulls().to_numpy().astype(np.float64)
    u, inv, c = np.unique(p, return_inverse=True, return_counts=True)
    return u, c.astype(np.int64), inv


def _range_of(values: np.ndarray, splitters: np.ndarray) -> np.ndarray:
    """The range (0 .. len(splitters)) of each p-value: how many splitters its key's top bits reach."""
    return np.searchsorted(splitters, exact_rank.order_keys(values) >> _SHIFT, side="right")


def _split(rows: pl.DataFrame, splitters: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """One part's distinct p-values with their counts, a piece per range (a task)."""
    u, c, _ = _distinct_p(rows)
    at = np.searchsorted(_range_of(u, splitters), np.arange(len(splitters) + 2))
    return [(u[at[r] : at[r + 1]], c[at[r] : at[r + 1]]) for r in range(len(splitters) + 1)]


def _scan(below: int, m: int, *pieces: tuple[np.ndarray, np.ndarray]) -> list[Any]:
    """One range of p-values (every part's piece; `below`: how many p-values lie below the range):
    per part, the minimum of BH's p m / rank over the range from each of its values up; last, the
    range's minimum (a task)."""
    vals = np.concatenate([u for u, _ in pieces])
    u, inv = np.unique(vals, return_inverse=True)
    counts = np.zeros(len(u), dtype=np.int64)
    np.add.at(counts, inv, np.concatenate([c for _, c in pieces]))
    rank = below + np.cumsum(counts)  # the last position of each value in the sorted p-values
    ranked = u * m / rank  # as benjamini_hochberg: (p * m) / rank, in float64
    up = np.minimum.accumulate(ranked[::-1])[::-1]
    out, at = [], 0
    for piece, _ in pieces:
        out.append(up[inv[at : at + len(piece)]])
        at += len(piece)
    return [*out, float(up[0]) if len(up) else math.inf]


def _finish(
    rows: pl.DataFrame, s: Setup, splitters: np.ndarray, above: np.ndarray, *minima: np.ndarray
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One part's q-values, flags and directions: its finished rows, and what the driver merges
    (`above[r]`: the minimum of every range above range r; `minima`: this part's pieces' minima
    from the scan, range by range) (a task)."""
    p = rows["p_value"].to_numpy().astype(np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        u, _, inv = _distinct_p(rows)
        qu = np.minimum(1.0, np.minimum(np.concatenate(minima), above[_range_of(u, splitters)]))
        q[ok] = qu[inv]
    rate = rows["removal_rate"].to_numpy().astype(np.float64)
    rest = rows["rest_rate"].to_numpy().astype(np.float64)
    sig = (q < s.alpha) & ~np.isnan(q)
    direction = np.where(~sig, None, np.where(rate > rest, "higher", "lower"))
    table = rows.with_columns(
        pl.Series("q_value", q, dtype=pl.Float64).fill_nan(None),
        pl.Series("too_small", rows["rows_in"].to_numpy() < s.min_group_size, dtype=pl.Boolean),
        pl.Series("significant", sig, dtype=pl.Boolean),
        pl.Series("direction", direction.tolist(), dtype=pl.String),
    )
    explained = pl.sum_horizontal(s.reasons) if s.reasons else pl.lit(0)
    broken = table.filter((pl.col("kept") + pl.col("removed") != pl.col("rows_in")) | (explained != pl.col("removed")))
    sums = table.select(pl.col(c).sum() for c in (*s.counts, *s.extra)).row(0, named=True)
    return table, {
        "top": table.head(s.top),
        "flagged": _by_q(table.filter(pl.col("significant"))).head(2 * s.top),
        "sums": {k: int(v or 0) for k, v in sums.items()},
        "distinct": table.height,
        "too_small": int(table["too_small"].sum()),
        "empty": int((table["rows_in"] == 0).sum()),
        "flagged_groups": int(sig.sum()),
        "flagged_higher": int((direction == "higher").sum()),
        "flagged_lower": int((direction == "lower").sum()),
        "broken": broken.height,
        "broken_first": broken.head(1),
    }


def _splitters(hist: exact_rank.Counts, ranges: int) -> tuple[np.ndarray, list[int]]:
    """Up to ranges - 1 histogram bins at which ranges of about equal count start, and how many
    p-values lie below each range."""
    bins, counts = hist
    cum = np.cumsum(counts)
    total = int(cum[-1]) if len(cum) else 0
    starts = {int(i) + 1 for i in np.searchsorted(cum, [total * r / ranges for r in range(1, ranges)])}
    splitters = np.array(sorted(bins[i] for i in starts if 0 < i < len(bins)), dtype=np.uint64)
    below = [0] + [int(cum[i - 1]) for i in np.searchsorted(bins, splitters)]
    return splitters, below


# --------------------------------------------------------------------------------------------------
# the full table, in parts


PART_FILE = re.compile(
    r"^(?P<name>.+)\.(?P<gen>\d{8}T\d{12}Z-[0-9a-f]{8})\.part-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$"
)


def _head(rows: pl.DataFrame, k: int) -> pl.DataFrame:
    return rows.head(k)


def _lookup(rows: pl.DataFrame, values: list[Any], as_string: bool, columns: list[str]) -> pl.DataFrame:
    if as_string:
        return rows.filter(pl.col(VALUE).cast(pl.String).is_in(values)).select(columns)
    return rows.filter(_in_values(VALUE, values, rows.schema)).select(columns)


def _write_part(path: str, rows: pl.DataFrame) -> dict[str, Any]:
    return io.write_parquet(path, rows.to_arrow())  # {bytes, sha256}: the run manifest's checksum


@dataclass
class GroupTable:
    """One grouping's full table (every group, with its statistics) in parts, where the tasks that
    computed them left them: futures of `executor`, each part a frame in the table's order. The
    driver asks for bounded answers (top, lookup, matching) or has the tasks write it (write)."""

    executor: Executor
    parts: list[Future]
    dtype: pl.DataType  # of the value column

    def frame(self) -> pl.DataFrame:
        """The whole table here, in its order: O(groups), for tests and small tables."""
        return table_order(pl.concat(self.executor.results(self.parts)))

    def top(self, k: int) -> pl.DataFrame:
        """The first k rows of the table (the largest groups): each part's first k, merged."""
        ex = self.executor
        heads = ex.results([ex.submit(_head, f, k, resources=TASK) for f in self.parts])
        return table_order(pl.concat(heads)).head(k)

    def lookup(self, values: pl.Series, columns: Sequence[str] = (VALUE, "rows_in")) -> pl.DataFrame:
        """The rows of these values (each asked of the one part that can hold it), any order."""
        vals = values.cast(self.dtype).unique()
        where = part_index(vals, len(self.parts))
        ex = self.executor
        asked = [
            ex.submit(_lookup, f, vals.filter(pl.Series(where == j)).to_list(), False, list(columns), resources=TASK)
            for j, f in enumerate(self.parts)
            if (where == j).any()
        ]
        found = ex.results(asked)
        return (
            pl.concat(found) if found else ex.result(ex.submit(_head, self.parts[0], 0, resources=TASK)).select(columns)
        )

    def matching(self, strings: Sequence[str], columns: Sequence[str] = (VALUE, "rows_in")) -> pl.DataFrame:
        """The rows whose value, as a string, is one of `strings` (every part asked), any order."""
        ex = self.executor
        return pl.concat(
            ex.results([ex.submit(_lookup, f, list(strings), True, list(columns), resources=TASK) for f in self.parts])
        )

    def write(self, tables_dir: str, name: str) -> dict[str, dict[str, Any]]:
        """Each part written by a task (io.write_parquet: atomic) as a new generation of the table
        `name`; then every other file of that table (an older generation, a part set that a killed
        write left incomplete, a single-file table of an older version) is deleted. Returns
        {part's path: its {bytes, sha256}} (hashed by the task that wrote it), in part order."""
        now = time.time()
        gen = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z-{uuid.uuid4().hex[:8]}"
        n = len(self.parts)
        paths = [io.join(tables_dir, f"{name}.{gen}.part-{i:05d}-of-{n:05d}.parquet") for i in range(n)]
        ex = self.executor
        digests = ex.results([ex.submit(_write_part, p, f, resources=TASK) for p, f in zip(paths, self.parts)])
        written = {_base(p) for p in paths}
        for old in _files_of(tables_dir, name):
            if _base(old) not in written:
                io.remove(old)
        return dict(zip(paths, digests))


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _files_of(tables_dir: str, name: str) -> list[str]:
    """Every file of table `name` under tables_dir: its parts of any generation, its single file."""
    if not io.exists(tables_dir):
        return []
    out = []
    for path in io.list_files(tables_dir):
        base = _base(path)
        m = PART_FILE.match(base)
        if (m and m["name"] == name) or base == f"{name}.parquet":
            out.append(path)
    return out


def table_files(tables_dir: str, name: str) -> list[str]:
    """The files that hold table `name` under tables_dir, in part order: the newest generation
    whose parts are all there, else the single file <name>.parquet (one table, e.g. of a version
    written before group tables were written in parts). FileNotFoundError when there is neither."""
    gens: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    single = None
    for path in _files_of(tables_dir, name):
        m = PART_FILE.match(_base(path))
        if m is None:
            single = path
            continue
        gens.setdefault(m["gen"], {})[int(m["i"])] = path
        sizes[m["gen"]] = int(m["n"])
    whole = [g for g, parts in gens.items() if set(parts) == set(range(sizes[g]))]
    if whole:
        g = max(whole)
        return [gens[g][i] for i in range(sizes[g])]
    if single is not None:
        return [single]
    raise FileNotFoundError(f"{tables_dir}: no table {name!r} (neither a whole set of parts nor {name}.parquet)")


def read_table(tables_dir: str, name: str) -> pl.DataFrame:
    """Table `name` as written under tables_dir (all its parts, concatenated in part order; a group
    table's parts are each in the table's order: table_order sorts the whole)."""
    return pl.concat([pl.from_arrow(io.read_parquet(p)) for p in table_files(tables_dir, name)])


# --------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Grouping:
    """What the report shows of one grouping, and where its full table is."""

    column: str
    shown: pl.DataFrame  # the shown groups (the table's columns), in the table's order
    sums: dict[str, int]  # every count column summed over every group
    distinct: int
    too_small: int
    flagged: int
    flagged_higher: int
    flagged_lower: int
    broken: int  # groups whose counts do not add up
    broken_first: pl.DataFrame  # the first of them in the table's order (no rows: none)
    table: GroupTable
    empty: int = 0  # groups with no row counted (a net-of-policy view: every row excluded)


def groupings(
    parts: dict[str, Parts], setup: Setup | Mapping[str, Setup], dtypes: dict[str, pl.DataType]
) -> dict[str, Grouping]:
    """Every grouping's shown groups, rollup sums and table, from its counts in parts (one task per
    part or range per round; the groupings' rounds go together). `setup`: one for every grouping,
    or one per grouping (a net-of-policy view has its own totals and count columns)."""
    setups = setup if isinstance(setup, Mapping) else {c: setup for c in parts}
    prep: dict[str, list[list[Future]]] = {}
    for c, p in parts.items():
        prep[c] = [p.executor.submit(_prepare, f, p.key, setups[c], resources=TASK, num_returns=2) for f in p.futures]
    ranges: dict[str, tuple[np.ndarray, list[int], int]] = {}
    split: dict[str, list[list[Future]]] = {}
    for c, p in parts.items():
        got = p.executor.results([f[1] for f in prep[c]])
        hist = exact_rank.merge(g["hist"] for g in got)
        m = sum(g["m"] for g in got)
        splitters, below = _splitters(hist, len(p.futures))
        ranges[c] = (splitters, below, m)
        if m:
            n = len(splitters) + 1
            split[c] = [p.executor.submit(_split, f[0], splitters, resources=TASK, num_returns=n) for f in prep[c]]
    scans: dict[str, list[list[Future]]] = {}
    for c, s in split.items():
        ex, (splitters, below, m) = parts[c].executor, ranges[c]
        n_parts = len(parts[c].futures)
        scans[c] = [
            ex.submit(_scan, below[r], m, *[piece[r] for piece in s], resources=TASK, num_returns=n_parts + 1)
            for r in range(len(splitters) + 1)
        ]
    out = {}
    for c, p in parts.items():
        ex, (splitters, _, _) = p.executor, ranges[c]
        above = np.array([math.inf])
        minima: list[list[Future]] = [[] for _ in p.futures]
        if c in scans:
            mins = ex.results([sc[-1] for sc in scans[c]])
            above = np.array([min(mins[r + 1 :], default=math.inf) for r in range(len(mins))])
            minima = [[sc[j] for sc in scans[c]] for j in range(len(p.futures))]
        fin = [
            ex.submit(_finish, f[0], setups[c], splitters, above, *minima[j], resources=TASK, num_returns=2)
            for j, f in enumerate(prep[c])
        ]
        out[c] = _merge(c, ex.results([f[1] for f in fin]), setups[c], GroupTable(ex, [f[0] for f in fin], dtypes[c]))
    return out


def _merge(column: str, parts: list[dict[str, Any]], setup: Setup, table: GroupTable) -> Grouping:
    k = setup.top
    top = table_order(pl.concat([p["top"] for p in parts])).head(k)
    flagged = pl.concat([p["flagged"] for p in parts]).join(top.select(VALUE), on=VALUE, how="anti", nulls_equal=True)
    shown = table_order(pl.concat([top, _by_q(flagged).head(k)]))
    return Grouping(
        column=column,
        shown=shown,
        sums={c: sum(p["sums"][c] for p in parts) for c in (*setup.counts, *setup.extra)},
        distinct=sum(p["distinct"] for p in parts),
        too_small=sum(p["too_small"] for p in parts),
        flagged=sum(p["flagged_groups"] for p in parts),
        flagged_higher=sum(p["flagged_higher"] for p in parts),
        flagged_lower=sum(p["flagged_lower"] for p in parts),
        broken=sum(p["broken"] for p in parts),
        broken_first=table_order(pl.concat([p["broken_first"] for p in parts])).head(1),
        table=table,
        empty=sum(p["empty"] for p in parts),
    )
