"""The per-group tables in parts (curate/reports/groups.py): a grouping with many values (50,000
domains) gives the same report on one frame (the local engine) and on blocks whose counts are
summed in many parts (the Ray engine), with the shown groups' counts, flags and q-values checked
against a recount here; the q-values of every group equal Benjamini-Hochberg over all of them;
the rollup row makes the rows add up to the totals; the driver never receives a full table; the
table is written in parts, read back whole, and replaced whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine_support import same_report

from curate import store
from curate.executor import LocalExecutor
from curate.filters.rules import RULE_ORDER
from curate.reports import groups, sources
from curate.reports.audit import write_tables
from curate.reports.groups import (
    GroupTable,
    Setup,
    benjamini_hochberg,
    read_table,
    table_files,
    table_order,
    two_proportion_p,
)
from curate.reports.html import render_html
from curate.reports.sources import BlockSource, FrameSource, Parts, split_by_hash
from curate.reports.summary import build_report

REASONS = [r.value for r in RULE_ORDER]
DOMAINS = 50_000


def many_domains(seed: int = 5, rows: int = 240_000) -> pl.DataFrame:
    """Rows of 50,000 domains (a few big, most of one to a few rows; one null domain), 5 % of them
    removed much more often than the rest, so that many groups are flagged."""
    rng = np.random.default_rng(seed)
    dom = np.concatenate([np.arange(DOMAINS), rng.zipf(1.4, rows - DOMAINS) % DOMAINS])
    rng.shuffle(dom)
    biased = rng.random(DOMAINS) < 0.05
    kept = rng.random(rows) >= np.where(biased[dom], 0.7, 0.3)
    first = np.array(REASONS, dtype=object)[rng.integers(0, len(REASONS), rows)]
    reason = np.where(kept, None, first)
    return pl.DataFrame(
        {
            "shard": [f"s{i % 7}" for i in range(rows)],
            "row": np.arange(rows),
            "kept": kept,
            "reason": reason.tolist(),
            "reasons": [[] if k else [r] for k, r in zip(kept, reason)],
            "domain": [None if d == 3 else f"d{d:05d}.com" for d in dom],
            "tld": [f"t{d % 17}" for d in dom],
            "language": [f"l{d % 5}" for d in dom],
        }
    )


class RecordingExecutor(LocalExecutor):
    """A LocalExecutor that records the size of every frame and array the driver receives
    (result() called by the driver; not the inputs a task receives)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []  # per frame received: its rows
        self.items: list[int] = []  # per numpy array received: its length
        self._in_task = False

    def submit(self, fn, *args, resources=sources.TASK, num_returns=None):
        self._in_task = True
        try:
            return super().submit(fn, *args, resources=resources, num_returns=num_returns)
        finally:
            self._in_task = False

    def result(self, future):
        value = super().result(future)
        if not self._in_task:
            self._record(value)
        return value

    def _record(self, v):
        if isinstance(v, pl.DataFrame):
            self.rows.append(v.height)
        elif isinstance(v, np.ndarray):
            self.items.append(len(v))
        elif isinstance(v, dict):
            for x in v.values():
                self._record(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                self._record(x)


def _blocks(df: pl.DataFrame, size: int, ex=None) -> BlockSource:
    ex = ex or LocalExecutor()
    return BlockSource(ex, [ex.submit(lambda d: d, df.slice(i, size)) for i in range(0, df.height, size)])


def _reference(df: pl.DataFrame, column: str, min_group_size: int = 30, alpha: float = 0.05) -> pl.DataFrame:
    """Counts, p and BH q of every group, recomputed here from the rows (independent of the parts)."""
    g = df.group_by(column).agg(pl.len().alias("rows_in"), (~pl.col("kept")).sum().alias("removed"))
    g = table_order(g.rename({column: "value"}))
    n1, x1 = g["rows_in"].to_numpy().astype(float), g["removed"].to_numpy().astype(float)
    p = np.where(n1 >= min_group_size, two_proportion_p(x1, n1, x1.sum() - x1, n1.sum() - n1), np.nan)
    q = benjamini_hochberg(p)
    return g.with_columns(pl.Series("q", q), pl.Series("flag", (q < alpha) & ~np.isnan(q)))


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return many_domains()


@pytest.fixture(scope="module")
def on_blocks(frame):
    """build_report on blocks of 20,000 rows, the domains' counts in 32 parts; the executor records
    what comes back to the driver."""
    mp = pytest.MonkeyPatch()
    mp.setattr(sources, "ROWS_PER_PART", 2_000)
    mp.setattr(sources, "OBJECT_ROWS", 1)
    ex = RecordingExecutor()
    try:
        rep, tables = build_report(_blocks(frame, 20_000, ex), top_groups=10, return_tables=True)
    finally:
        mp.undo()
    return rep, tables, ex, (list(ex.rows), list(ex.items))  # what build_report received


def test_many_domains_the_same_report_on_a_frame_and_in_parts(frame, on_blocks):
    rep, tables, _, _ = on_blocks
    assert len(tables["groups_domain"].parts) > 16  # the counts really were cut into many parts
    local, local_tables = build_report(FrameSource(frame), top_groups=10, return_tables=True)
    assert len(local_tables["groups_domain"].parts) == 1
    same_report(local, rep)
    for c in ("domain", "tld", "language"):
        assert tables[f"groups_{c}"].frame().equals(local_tables[f"groups_{c}"].frame()), c


def test_shown_groups_exact_flags_and_rollup(frame, on_blocks):
    rep, _, _, _ = on_blocks
    sec = rep["groups"]["domain"]
    ref = _reference(frame, "domain")
    assert sec["distinct"] == ref.height == DOMAINS
    assert sec["flagged_groups"] == int(ref["flag"].sum()) > 10  # more flagged than top_groups shows
    # shown: the 10 largest, then the 10 most significant flagged beyond them (ties: table order)
    beyond = ref.slice(10).filter(pl.col("flag")).with_row_index("_i").sort(["q", "_i"]).head(10)
    want = table_order(pl.concat([ref.head(10), beyond.drop("_i")]))
    rows, rollup = sec["rows"][:-1], sec["rows"][-1]
    assert [r["value"] for r in rows] == ["(unknown)" if v is None else v for v in want["value"]]
    assert sec["shown"] == len(rows) == 20
    for r, w in zip(rows, want.iter_rows(named=True)):
        assert (r["rows_in"], r["removed"]) == (w["rows_in"], w["removed"])
        assert r["q_value"] == w["q"] and r["significant"] == w["flag"]  # bit for bit
    # the rollup: everything not shown, so that the rows add up to the totals
    assert rollup["other_groups"] == DOMAINS - 20 and rollup["value"] == f"(other {DOMAINS - 20} groups)"
    for k in ("rows_in", "kept", "removed"):
        assert sum(r[k] for r in sec["rows"]) == rep["totals"][k]
    for r in REASONS:
        assert sum(g["removed_by_reason"][r] for g in sec["rows"]) == next(
            x["removed_first"] for x in rep["reasons"] if x["reason"] == r
        )
        assert sum(g["failed_any"][r] for g in sec["rows"]) == next(
            x["failed_any"] for x in rep["reasons"] if x["reason"] == r
        )
    assert rollup["reconciles"] and rep["reconciles"]
    page = render_html(rep)
    assert f"(other {DOMAINS - 20:,} groups)" in page or f"(other {DOMAINS - 20} groups)" in page
    assert f"{rollup['rows_in']:,}" in page and "summed in the last row" in page


def test_the_driver_never_receives_a_full_table(on_blocks):
    _, tables, ex, (rows, items) = on_blocks
    # what came back: small answers per part (first rows, 2 x top_groups flagged candidates, one
    # broken row, sums) and histograms of p-values, never a table of every value
    assert rows and max(rows) <= 2 * 10 and sum(rows) < DOMAINS / 10, (max(rows), sum(rows))
    assert max(items, default=0) <= 2**groups.HIST_BITS
    # the check can fail: asking for the whole table is seen
    seen = len(ex.rows)
    tables["groups_domain"].frame()
    assert sum(ex.rows[seen:]) == DOMAINS


def test_parts_follow_the_block_answers():
    """One part for a grouping of few values; about ROWS_PER_PART block answer rows per part, up to
    PARTS_MAX; no more parts than leave OBJECT_ROWS rows per block and part."""
    assert sources.parts_for(928 * 200, 928) == 1  # languages: ~200 a block
    assert sources.parts_for(928 * 1500, 928) == 2  # TLDs: 1.4e6 block answer rows
    assert sources.parts_for(928 * 300_000, 928) == sources.PARTS_MAX  # LAION's domains
    assert sources.parts_for(5_000_000, 10) == 5
    assert sources.parts_for(5_000_000, 2_500) == 3  # 5e6 / (2500 blocks x 512 rows)
    assert sources.parts_for(0, 4) == 1


def _parts_of(counts: pl.DataFrame, parts: int) -> Parts:
    ex = LocalExecutor()
    return Parts(ex, [ex.submit(lambda d: d, f) for f in split_by_hash(counts, "value", parts)], "value")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("parts", [1, 3, 40])
def test_q_values_of_every_group_are_benjamini_hochberg(seed, parts, monkeypatch):
    """Counts made for awkward p-values (many exact ties, 0 from underflow, 1, untested groups;
    odd seeds: mostly groups removed at the overall rate, p-values spread over (0, 1], where a
    small p-value's q comes from a larger one, often in another range): every group's q-value, in
    whatever number of parts and ranges of p-values, equals benjamini_hochberg over all the groups
    at once, bit for bit."""
    rng = np.random.default_rng(seed)
    n = rng.choice([5, 30, 31, 40, 100, 1000], 3000)
    if seed % 2:
        x = rng.binomial(n, np.where(rng.random(3000) < 0.05, 0.42, 0.5))
    else:
        x = (n * rng.choice([0.0, 0.1, 0.3, 0.31, 0.5, 1.0], 3000)).astype(np.int64)
    n, x = np.append(n, 10**6), np.append(x, 0)  # a big group removing nothing: p underflows to 0
    d = int(n.sum() - 2 * x.sum())  # one more group so that half of all rows are removed: then a
    nb = abs(d) + 2 * 10**5  # group removing half of its rows has the rest's rate, z = 0, p = 1
    n, x = np.append(n, nb), np.append(x, (d + nb) // 2)
    counts = pl.DataFrame({"value": [f"g{i}" for i in range(len(n))], "rows_in": n, "kept": n - x, "removed": x})
    counts = counts.with_columns(
        pl.col("removed").alias(f"r:{REASONS[0]}"), *(pl.lit(0).alias(f"r:{r}") for r in REASONS[1:])
    )
    setup = Setup(
        counts=("rows_in", "kept", "removed", *(f"r:{r}" for r in REASONS)),
        extra=(),
        tot_n=int(n.sum()),
        tot_x=int(x.sum()),
        min_group_size=30,
        alpha=0.05,
        top=5,
    )
    scans = []
    real = groups._scan
    monkeypatch.setattr(groups, "_scan", lambda *a: scans.append(1) or real(*a))
    got = groups.groupings({"value": _parts_of(counts, parts)}, setup, {"value": pl.String})["value"]
    table = got.table.frame()
    assert table.height == len(n) and len(got.table.parts) == parts
    p = table["p_value"].to_numpy()
    assert (p == 0).any() and (p == 1).any() and np.isnan(p).any()
    if seed % 2 == 0:
        assert len(np.unique(p[~np.isnan(p)])) < (~np.isnan(p)).sum() / 10  # mostly ties
    want = benjamini_hochberg(p)
    assert np.array_equal(table["q_value"].to_numpy(), want, equal_nan=True)
    assert table["significant"].to_list() == list((want < 0.05) & ~np.isnan(want))
    assert len(scans) == 1 if parts == 1 else len(scans) > 1  # p-values scanned in several ranges
    whole = groups.groupings({"value": _parts_of(counts, 1)}, setup, {"value": pl.String})["value"]
    assert whole.shown.equals(got.shown) and whole.sums == got.sums


def test_all_groups_too_small_or_one_group():
    """No p-value at all (every group below min_group_size; one group holding every row): no
    range round, q null everywhere, nothing flagged, in one part or many."""
    for df in (
        pl.DataFrame({"domain": [f"d{i}" for i in range(50)] * 3, "kept": [True, False] * 75}),
        pl.DataFrame({"domain": ["only.com"] * 100, "kept": [True, False] * 50}),
    ):
        df = df.with_columns(
            pl.lit("s").alias("shard"),
            pl.when(pl.col("kept")).then(None).otherwise(pl.lit("language")).alias("reason"),
            pl.lit("t").alias("tld"),
            pl.lit("l").alias("language"),
        )
        for src in (FrameSource(df), _blocks(df, 40)):
            rep, tables = build_report(src, top_groups=3, return_tables=True)
            t = tables["groups_domain"].frame()
            assert t["q_value"].null_count() == t.height and not t["significant"].any()
            assert rep["groups"]["domain"]["flagged_groups"] == 0 and rep["reconciles"]


def test_written_in_parts_read_whole_and_replaced_whole(frame, on_blocks, tmp_path):
    _, tables, _, _ = on_blocks
    table = tables["groups_domain"]
    d = tmp_path / "tables"
    (d).mkdir()
    (d / "groups_domain.parquet").write_bytes(b"an older single-file table")  # a version before parts
    first_digests = write_tables({"groups_domain": table, "totals": pl.DataFrame({"n": [1]})}, str(tmp_path))
    first = list(first_digests)
    for p, digest in first_digests.items():  # each file's digest, from the process that wrote it
        assert digest == {"bytes": Path(p).stat().st_size, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
    names = sorted(p.name for p in d.iterdir())
    assert len(names) == len(table.parts) + 1 and "groups_domain.parquet" not in names  # the old file went
    assert all(store.selection_owned(f"tables/{n}") for n in names)  # a selection's own files (publish)
    assert table_files(str(d), "groups_domain") == first[:-1]
    got = read_table(str(d), "groups_domain")
    assert table_order(got).equals(table.frame())
    # each part in the table's order
    for p in first[:-1]:
        part = pl.read_parquet(p)
        assert part.equals(table_order(part))
    # rewritten (curate report): a new generation replaces the old one whole
    again = list(write_tables({"groups_domain": table}, str(tmp_path)))
    assert sorted(p.name for p in d.glob("groups_domain.*")) == sorted(p.rsplit("/", 1)[-1] for p in again)
    # a newer generation that a killed write left incomplete is not read; the next write removes it
    name = again[0].rsplit("/", 1)[-1]
    stray = d / name.replace(groups.PART_FILE.match(name)["gen"], "99991231T235959999999Z-00000000")
    stray.write_bytes(b"half")
    assert table_files(str(d), "groups_domain") == again
    write_tables({"groups_domain": table}, str(tmp_path))
    assert not stray.exists()
    # a single-file table (an older version) is still read
    (d / "groups_tld.parquet").write_bytes(b"")
    pl.DataFrame({"value": ["a"], "rows_in": [1]}).write_parquet(d / "groups_tld.parquet")
    assert read_table(str(d), "groups_tld")["rows_in"].to_list() == [1]
    with pytest.raises(FileNotFoundError):
        table_files(str(d), "groups_language")


def test_sweep_and_flips_ask_the_parts_for_sizes(monkeypatch):
    """The sweep's largest and named groups and the flips' group sizes, asked of the report's
    tables in parts: the same answers as counted from every row here."""
    from test_report_sweep import SEL, synthetic_annotations

    from curate.config import SelectionConfig
    from curate.filters.decide import decide
    from curate.reports.sweep import flips, representatives, sweep

    ann = synthetic_annotations()
    sel = SelectionConfig(**SEL)
    decisions = decide(ann, sel)[0].collect()
    monkeypatch.setattr(sources, "ROWS_PER_PART", 3)
    monkeypatch.setattr(sources, "OBJECT_ROWS", 1)
    _, tables = build_report(_blocks(decisions, 500), group_columns=("domain", "language"), return_tables=True)
    gt = {c: tables[f"groups_{c}"] for c in ("domain", "language")}
    assert len(gt["domain"].parts) > 3
    thr = [0.2, 0.25, 0.3, 0.35]
    include = {"domain": ["d7.com", "d11.com", "nope.com"], "language": ["fr"]}
    kw = dict(group_columns=["language", "domain"], top_groups=3, include=include)
    want = sweep(ann, sel, thr, **kw)
    got = sweep(ann, sel, thr, **kw, group_tables=gt)
    assert got["tables"]["sweep"].equals(want["tables"]["sweep"])
    got.pop("tables"), want.pop("tables")
    assert got == want and any(g["named"] for g in got["groups"]["domain"])
    reps = representatives(ann, sel)
    sizes = {c: ann.group_by(c).agg(pl.len().cast(pl.Int64).alias("rows_in")).collect() for c in ("language", "domain")}
    a = flips(reps, 0.25, 0.33, group_columns=["language", "domain"], sizes=sizes)
    b = flips(reps, 0.25, 0.33, group_columns=["language", "domain"], sizes=gt)
    assert a["groups"] == b["groups"] and a["groups"]["domain"][0]["rows_in"]
    for c in ("language", "domain"):
        assert a["tables"][f"flips_{c}"].equals(b["tables"][f"flips_{c}"])


def test_on_ray_the_same_report_and_table(frame, ray_session, tmp_path, monkeypatch):
    """On Ray (num_returns shuffles, tasks writing the parts): the report and the written table
    equal the local engine's."""
    from curate.ray_adapter import RayExecutor

    small = frame.head(60_000)
    monkeypatch.setattr(sources, "ROWS_PER_PART", 4_000)
    monkeypatch.setattr(sources, "OBJECT_ROWS", 1)
    rep, tables = build_report(_blocks(small, 15_000, RayExecutor()), top_groups=10, return_tables=True)
    assert len(tables["groups_domain"].parts) > 4
    local, local_tables = build_report(FrameSource(small), top_groups=10, return_tables=True)
    same_report(local, rep)
    write_tables({"groups_domain": tables["groups_domain"]}, str(tmp_path))
    got = table_order(read_table(str(tmp_path / "tables"), "groups_domain"))
    assert got.equals(local_tables["groups_domain"].frame())
    assert isinstance(tables["groups_domain"], GroupTable)
