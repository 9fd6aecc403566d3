"""Comparing two selections of one run (the local and the Ray selection engine): the same rows in
the same files, the same uids.npy bytes, the same counts and the same report numbers."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest


def same_report(a, b, path: str = "report") -> None:
    """Equal report numbers: counts, order statistics (quantiles, min, max) and everything else
    exactly; a mean up to float summation order (the Ray engine adds block sums in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k == "mean" and isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15), f"{path}.{k}"
            else:
                same_report(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_report(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def report_numbers(sel: Path) -> dict:
    """report.json without what names the selection and its engine (meta, settings)."""
    r = json.loads((sel / "report.json").read_text())
    return {k: v for k, v in r.items() if k not in ("meta", "settings")}


def same_selection(a: Path, b: Path) -> None:
    """Selections a and b of one run hold the same decisions, uid file, counts and report."""
    subs = sorted(p.name for p in a.iterdir() if p.is_dir() and p.name != "tables")
    assert subs == sorted(p.name for p in b.iterdir() if p.is_dir() and p.name != "tables")
    for sub in subs:
        assert sorted(p.name for p in (a / sub).iterdir()) == sorted(p.name for p in (b / sub).iterdir()), sub
        ta = pl.read_parquet(a / sub / "*.parquet").sort("shard", "row")
        assert ta.equals(pl.read_parquet(b / sub / "*.parquet").sort("shard", "row")), sub
    assert (a / "uids.npy").read_bytes() == (b / "uids.npy").read_bytes()
    ja, jb = json.loads((a / "selection.json").read_text()), json.loads((b / "selection.json").read_text())
    for k in ("resolved", "counts", "shards", "reconciles"):
        assert ja[k] == jb[k], k
    same_report(report_numbers(a), report_numbers(b))
