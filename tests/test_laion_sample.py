"""The real LAION sample (URL/TEXT) through read -> annotate -> select on real Ray, no fetch:
language and domain reports that reconcile."""

import json

import polars as pl
import pytest

from curate.executor import LocalExecutor
from curate.config import load_spec
from curate.presets import preset_path
from curate.runner import run


@pytest.fixture(scope="module")
def laion_run(tmp_path_factory, laion_sample):
    out = tmp_path_factory.mktemp("laion") / "run"
    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{"input.paths": [str(laion_sample)], "output.dir": str(out)}
    )
    result = run(spec, executor=LocalExecutor())  # the sample is under test, not where shards run
    assert result.ok, result.failed
    return out, result


def test_every_row_is_kept_or_removed_with_a_reason(laion_run):
    out, result = laion_run
    sel = out / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet")
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    assert kept.height + removed.height == 10_000
    assert removed["reason"].null_count() == 0
    assert set(removed["reason"].unique()) <= {"language", "caption_length", "duplicate_url"}
    rows = pl.concat([kept.select("shard", "row"), removed.select("shard", "row")])
    assert rows.n_unique() == 10_000
    # no fetch, no model: nothing was downloaded or scored
    assert kept["fetch_status"].unique().to_list() == ["not_needed"]
    assert kept["clip_score"].null_count() == kept.height


def test_language_and_domain_reports(laion_run):
    out, _ = laion_run
    rep = json.loads((out / "selections" / "default" / "report.json").read_text())
    assert rep["reconciles"] is True
    assert rep["totals"]["rows_in"] == 10_000
    langs = {g["value"]: g for g in rep["groups"]["language"]["rows"]}
    assert langs["en"]["rows_in"] > 8_000
    # the language rule removes every non-English caption, so e.g. German is removed entirely
    assert langs["de"]["removal_rate"] == 1.0
    domains = {g["value"]: g for g in rep["groups"]["domain"]["rows"]}
    assert "wp.com" in domains  # i0.wp.com, i1.wp.com, ... grouped under the registered domain
    assert not any(v.startswith("i0.") or v.startswith("www.") for v in domains)
    tlds = {g["value"] for g in rep["groups"]["tld"]["rows"]}
    assert "co.uk" in tlds
    html = (out / "selections" / "default" / "report.html").read_text()
    assert "wp.com" in html and "10,000" in html


def test_uid_file_is_sorted_datacomp_pairs(laion_run):
    import numpy as np

    out, _ = laion_run
    uids = np.load(out / "selections" / "default" / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8")
    kept = pl.read_parquet(out / "selections" / "default" / "kept" / "*.parquet")
    assert len(uids) == kept["uid"].n_unique()
    as_list = uids.tolist()
    assert as_list == sorted(as_list)
    first = kept["uid"].sort()[0]
    assert (int(first[:16], 16), int(first[16:], 16)) in set(as_list)


def test_unknown_report_group_column_fails_before_writing(laion_run):
    from curate.config import ReportConfig, SelectionConfig
    from curate.selection import write_selection

    out, _ = laion_run
    with pytest.raises(ValueError, match=r"\['source'\] are not annotation columns"):
        write_selection(str(out), SelectionConfig(name="bad_groups"), ReportConfig(group_columns=["source"]))
    assert not (out / "selections" / "bad_groups").exists()


def test_the_ray_engine_selects_the_sample_the_same(laion_run, ray_session):
    """selection.engine = "ray" on the 10,000 real LAION rows: the local engine's selection."""
    from engine_support import same_selection

    from curate.config import SelectionConfig
    from curate.selection import write_selection

    out, _ = laion_run
    spec = load_spec(preset_path("laion_sample"))
    for engine in ("local", "ray"):
        sel = spec.selection.model_copy(update={"name": f"engine-{engine}", "engine": engine})
        write_selection(str(out), SelectionConfig.model_validate(sel.model_dump()), spec.report)
    same_selection(out / "selections" / "engine-local", out / "selections" / "engine-ray")
    removed = pl.read_parquet(out / "selections" / "engine-ray" / "removed" / "*.parquet")
    assert (removed["reason"] == "duplicate_url").sum() > 0


def test_caption_near_duplicates_of_the_sample_on_both_engines(laion_sample, tmp_path, ray_session):
    """Caption near-dedup of the 10,000 real LAION captions on the Ray engine over several blocks:
    the band-key shuffle, verification between blocks and the distributed components give the
    local engine's selection, with real buckets (many captions sharing a band)."""
    from engine_support import same_selection

    from curate.config import SelectionConfig
    from curate.selection import write_selection

    rows = pl.read_parquet(laion_sample)
    # + 2,000 near copies at new URLs: upper-cased, last word dropped, or a word replaced
    long = rows.filter(pl.col("TEXT").str.split(" ").list.len() >= 8).head(2_000)
    edits = [
        pl.col("TEXT").str.to_uppercase(),
        pl.col("TEXT").str.replace(r"\s+\S+$", ""),
        pl.col("TEXT").str.replace(r"^\S+", "photo"),
    ]
    copies = (
        long.with_row_index("_k")
        .with_columns(
            pl.when(pl.col("_k") % 3 == 0)
            .then(edits[0])
            .when(pl.col("_k") % 3 == 1)
            .then(edits[1])
            .otherwise(edits[2]),
            (pl.col("URL") + "?copy=" + pl.col("_k").cast(pl.String)).alias("URL"),
        )
        .drop("_k")
    )
    rows = pl.concat([rows, copies]).sample(fraction=1.0, shuffle=True, seed=5)
    (tmp_path / "in").mkdir()
    for i in range(4):  # four shards, so the blocks below cut the pool
        rows.slice(i * 3_000, 3_000).write_parquet(tmp_path / "in" / f"part-{i}.parquet")
    out = tmp_path / "run"
    spec = load_spec(preset_path("laion_sample")).with_overrides(
        **{"input.paths": [str(tmp_path / "in")], "output.dir": str(out), "annotate.caption_minhash": True}
    )
    assert run(spec, executor=LocalExecutor()).ok
    base = spec.selection.model_dump()
    for engine in ("local", "ray"):
        sel = {**base, "name": f"near-{engine}", "engine": engine, "block_rows": 3_000}
        sel["dedup"] = {**base["dedup"], "caption_jaccard": 0.5, "partitions": 3}
        write_selection(str(out), SelectionConfig.model_validate(sel), spec.report)
    same_selection(out / "selections" / "near-local", out / "selections" / "near-ray")
    removed = pl.read_parquet(out / "selections" / "near-ray" / "removed" / "*.parquet")
    assert (removed["reason"] == "duplicate_caption").sum() > 1_000
