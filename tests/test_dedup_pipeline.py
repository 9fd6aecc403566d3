"""Dedup end to end through `curate run`: caption MinHash band keys computed per shard by
prepare tasks on Ray workers, the global step (selection.engine = "ray") finding copies across shards,
and attribution that points at kept rows."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.executor import LocalExecutor
from curate.config import load_spec
from curate.presets import preset_path
from curate.runner import run


def _edit(caption: str, rng: np.random.Generator) -> str:
    """One word replaced or dropped, and the case changed: a re-posted caption."""
    words = caption.split()
    j = int(rng.integers(len(words)))
    if rng.random() < 0.5:
        words[j] = "really"
    else:
        del words[j]
    return " ".join(words).upper()


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory, laion_sample):
    rng = np.random.default_rng(3)
    src = pl.read_parquet(laion_sample).select("URL", "TEXT").head(3000)
    inp = tmp_path_factory.mktemp("capdedup")
    a, b = src.head(1500), src.tail(1500)
    # copies of 150 long captions of shard A, with new URLs, in shard B
    long_a = a.with_row_index("i").filter(pl.col("TEXT").str.split(" ").list.len() >= 20).head(150)
    copies = pl.DataFrame(
        {
            "URL": [f"https://mirror.example.org/c/{i}.jpg" for i in range(long_a.height)],
            "TEXT": [_edit(t, rng) for t in long_a["TEXT"]],
        }
    )
    a.write_parquet(inp / "part-00000.parquet")
    pl.concat([b, copies]).write_parquet(inp / "part-00001.parquet")
    out = inp / "run"
    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{
            "input.paths": [str(inp)],
            "output.dir": str(out),
            "annotate.caption_minhash": True,
            "selection.dedup.caption_jaccard": 0.8,
            "selection.engine": "ray",
            "selection.dedup.partitions": 4,
        }
    )
    result = run(spec, executor=LocalExecutor())  # dedup is under test, not where shards run
    assert result.ok, result.failed
    return out, long_a, copies


def _jaccard(x: str, y: str) -> float:
    from curate.stages.caption_minhash import shingle_hashes

    rows, hv = shingle_hashes([x, y])
    a, b = set(hv[rows == 0].tolist()), set(hv[rows == 1].tolist())
    return len(a & b) / len(a | b)


def _decisions(out) -> pl.DataFrame:
    sel = out / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    return pl.concat([kept, pl.read_parquet(sel / "removed" / "*.parquet")], how="diagonal_relaxed")


def test_copies_in_another_shard_are_found_and_attributed(caption_run):
    out, originals, copies = caption_run
    d = _decisions(out)
    assert d.height == 3000 + copies.height and d.select("shard", "row").n_unique() == d.height
    orig = (
        d.filter(pl.col("shard") == "part-00000")
        .join(originals.select(pl.col("i").cast(pl.Int64).alias("row")), on="row", how="semi")
        .sort("row")
    )
    copy = d.filter((pl.col("shard") == "part-00001") & (pl.col("row") >= 1500)).sort("row")
    assert orig.height == copy.height == copies.height
    # pairs where both rows pass every other rule: exactly one of the two is kept, the other is
    # a duplicate_caption of it (or both lose to a third copy already in the sample)
    # and whose true Jaccard is >= threshold + 0.05 (the recall bar; LSH is probabilistic
    # just above the threshold)
    other = {"language", "caption_length", "duplicate_url"}
    both = [
        (o, c)
        for o, c in zip(orig.iter_rows(named=True), copy.iter_rows(named=True))
        if not (set(o["reasons"] or []) & other)
        and not (set(c["reasons"] or []) & other)
        and _jaccard(o["caption"], c["caption"]) >= 0.85
    ]
    assert len(both) >= 30
    found = sum(
        (o["kept"] and c["reason"] == "duplicate_caption" and c["duplicate_of"] == o["uid"])
        or (c["kept"] and o["reason"] == "duplicate_caption" and o["duplicate_of"] == c["uid"])
        or (o["duplicate_cluster"] is not None and o["duplicate_cluster"] == c["duplicate_cluster"])
        for o, c in both
    )
    assert found / len(both) >= 0.95, (found, len(both))
    # a pair split across the two shards, i.e. across two prepare tasks
    assert any(o["shard"] != c["shard"] and (o["kept"] != c["kept"]) for o, c in both)
    kept = set(d.filter(pl.col("kept"))["uid"].to_list())
    assert set(d.filter(pl.col("duplicate_of").is_not_null())["duplicate_of"].to_list()) <= kept
    summary = json.loads((out / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] and summary["counts"]["rows"] == d.height


def test_report_breaks_caption_dedup_down_by_domain_and_language(caption_run):
    out, _, copies = caption_run
    rep = json.loads((out / "selections" / "default" / "report.json").read_text())
    text = json.dumps(rep)
    assert "duplicate_caption" in text
    d = _decisions(out)
    n_dup = int((d["reason"] == "duplicate_caption").sum())
    assert n_dup >= 50
    # the mirror domain holds the copies: its removals by duplicate_caption show in the domain table
    mirror = d.filter(
        pl.col("url").str.contains("mirror.example.org") & (pl.col("reason") == "duplicate_caption")
    ).height
    assert mirror > 0 and str(mirror) in text
