"""Rules declared once (filters/rules.py RULES): the check order, help table, text rules, sweep
inputs and `curate select` flags all come from the registry, and the two rules added through it
(caption.max_words; exact caption dedup, normalised for case, whitespace and punctuation) work in
`curate run`, `curate select` with their flags, the sweep and the report."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.annotations import ANNOTATION_COLUMNS, conform
from curate.cli import app
from curate.config import PipelineSpec, SelectionConfig, SpecError, parse_spec
from curate.filters import rules
from curate.filters.rules import FLAGS, REASON_HELP, RULE_ORDER, RULES, Reason
from curate.filters.decide import decide

MINIMAL = {"name": "t", "input": {"paths": ["x.parquet"]}}


# --- the registry is the one source ----------------------------------------------------------------


def test_order_help_and_reasons_come_from_the_registry():
    single = [r for r in RULES if r.names is None]  # a rule family (concepts) has a reason per name: concept:<name>
    assert [r.value for r in RULE_ORDER] == [r.reason for r in single]
    assert [m.value for m in Reason] == [r.reason for r in single]
    assert set(REASON_HELP) == set(Reason) and all(REASON_HELP[r] for r in Reason)
    assert rules.reason_order() == tuple(r.value for r in RULE_ORDER)  # no family member without a spec
    for r in RULES:  # exactly one way to decide: a failure, an exact key, a near-dedup step or a family
        assert (r.fails is not None) + (r.key is not None) + r.near + (r.names is not None) == 1, r.name
        assert (r.names is None) == (r.instance_fails is None) == (r.instance_help is None), r.name
        assert r.phase != "dedup" or r.fails is None, r.name
    # dedup after every per-row rule, duplicate_uid last
    phases = [r.phase for r in RULES]
    assert phases.index("dedup") == len(phases) - phases[::-1].count("dedup") and RULES[-1].reason == "duplicate_uid"


def test_every_flag_sets_a_real_selection_key_and_appears_in_select_help():
    fields = SelectionConfig.model_json_schema()
    import typer.main

    options = {o for p in typer.main.get_command(app).commands["select"].params for o in (*p.opts, *p.secondary_opts)}
    for flag in FLAGS:
        section, *rest = flag.key.split(".")
        assert section in fields["properties"], flag.key
        if rest:
            sub = SelectionConfig.model_fields[section].annotation.model_fields
            assert rest[0] in sub, flag.key
        assert set(flag.decl.split("/")) <= options, flag.decl


def test_the_sweep_reads_every_rule_input():
    for r in RULES:
        assert set(r.inputs) <= set(rules.RULE_INPUTS), r.name
    assert set(rules.RULE_INPUTS) <= set(ANNOTATION_COLUMNS)


def test_text_rules_are_the_input_and_text_phases():
    sel = SelectionConfig.model_validate({"caption": {"max_words": 3}, "language": {"allow": ["en"]}})
    frame = pl.DataFrame(
        {
            "url": ["http://a", None, "http://c", "http://d"],
            "language": ["en", "en", "de", "en"],
            "language_score": [0.9] * 4,
            "caption_words": [2, 2, 2, 9],
            "caption_chars": [10] * 4,
        }
    )
    assert rules.text_rules_mask(frame, sel).to_list() == [True, False, False, False]


# --- caption.max_words ------------------------------------------------------------------------------


def _ann(captions: list[str | None], **cols) -> pl.LazyFrame:
    n = len(captions)
    base = {
        "shard": ["s"] * n,
        "row": list(range(n)),
        "uid": [f"{i:032x}" for i in range(n)],
        "url": [f"http://x/{i}" for i in range(n)],
        "url_normalized": [f"http://x/{i}" for i in range(n)],
        "caption": captions,
        "fetch_status": ["ok"] * n,
        "clip_score": [0.3] * n,
        **cols,
    }
    return pl.from_arrow(conform(pa.table(base))).lazy()


def test_max_words_removes_long_captions_as_caption_length():
    ann = _ann(["a b", "a b c", "a b c d"], caption_words=[2, 3, 4])
    d = decide(ann, SelectionConfig.model_validate({"caption": {"max_words": 3}}))[0].collect().sort("row")
    assert d["kept"].to_list() == [True, True, False]
    assert d["reason"].to_list() == [None, None, "caption_length"]


def test_impossible_caption_bounds_are_refused_naming_both_keys():
    for unit in ("words", "chars"):
        with pytest.raises(SpecError, match=rf"min_{unit} = 5 > max_{unit} = 4"):
            parse_spec({**MINIMAL, "selection": {"caption": {f"min_{unit}": 5, f"max_{unit}": 4}}})


def test_caption_ngram_moved_to_annotate_and_the_old_key_says_where():
    with pytest.raises(SpecError, match=r"selection.dedup.caption_ngram moved to annotate.caption_ngram"):
        parse_spec({**MINIMAL, "selection": {"dedup": {"caption_ngram": 3}}})
    assert parse_spec({**MINIMAL, "annotate": {"caption_ngram": 3}}).annotate.caption_ngram == 3


# --- exact caption dedup: a reference written here, Data-Juicer's document dedup without digits ----


def ref_normalized(caption: str | None) -> str | None:
    """Lower case, every Unicode punctuation character (category P*) a space, whitespace runs one
    space, trimmed; None when empty. (Data-Juicer's document_deduplicator with lowercase and
    ignore_non_character also drops digits and ASCII-only punctuation; captions keep digits.)"""
    if caption is None:
        return None
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in caption.lower())
    text = " ".join(text.split())
    return text or None


def test_normalisation_equals_the_reference_on_real_captions(laion_sample):
    caps = pq.read_table(laion_sample, columns=["TEXT"]).column("TEXT").to_pylist()
    variants = [c.upper() + " !!" if i % 3 == 0 else f"  {c}\t\u3001" for i, c in enumerate(caps[:500]) if c]
    caps = caps + variants + ["", "  ", "!!!", None, "Ünïcødé — “quoted”", "İstanbul", "a\u00a0b"]
    got = pl.select(rules.normalized_caption(pl.Series(caps, dtype=pl.String))).to_series().to_list()
    want = [ref_normalized(c) for c in caps]
    diff = [(c, g, w) for c, g, w in zip(caps, got, want) if g != w]
    assert not diff, diff[:5]


def test_exact_caption_dedup_keeps_the_first_of_each_normalised_caption(laion_sample):
    caps = pq.read_table(laion_sample, columns=["TEXT"]).column("TEXT").to_pylist()[:2000]
    rng = np.random.default_rng(3)
    picks = rng.integers(0, len(caps), 600)
    variants = [str.upper, lambda c: c + "!!", lambda c: c.replace(" ", "  "), lambda c: f"'{c}'"]
    caps = caps + [variants[i % 4](caps[j] or "") for i, j in enumerate(picks)]
    order = rng.permutation(len(caps))
    caps = [caps[i] for i in order]
    ann = _ann(caps)
    sel = SelectionConfig.model_validate(
        {"dedup": {"url": False, "image_sha256": False, "caption_exact": True, "survivor": "first"}}
    )
    d = decide(ann, sel)[0].collect().sort("row")
    seen: dict[str, str] = {}
    want_kept, want_of = [], []
    for i, c in enumerate(caps):  # keep-first in input order, as DataTrove / Data-Juicer walk rows
        key = ref_normalized(c)
        dup = key is not None and key in seen
        want_kept.append(not dup)
        want_of.append(seen[key] if dup else None)
        if key is not None and not dup:
            seen[key] = f"{i:032x}"
    assert sum(not k for k in want_kept) > 550  # the data has many duplicates to find
    assert d["kept"].to_list() == want_kept
    assert d["duplicate_of"].to_list() == want_of
    assert set(d.filter(~pl.col("kept"))["reason"]) == {"duplicate_caption_exact"}


# --- end to end: curate run, curate select with the flags, the sweep and the report ----------------


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A run that scores from an input column (no fetch, no model): 3 shards of real LAION captions
    with case/punctuation copies and long captions, and the two new rules in the spec. On the
    in-process executor: what is tested here is the rules, not where the shards ran."""
    from curate.executor import LocalExecutor
    from curate.runner import run

    base = tmp_path_factory.mktemp("registry")
    captions = pq.read_table(
        Path(__file__).resolve().parent.parent / "data" / "laion-sample" / "laion_10000.parquet", columns=["TEXT"]
    )
    caps = [c for c in captions.column("TEXT").to_pylist() if c][:240]
    caps = caps + [c.upper() + "!" for c in caps[:60]] + [" ".join(["word"] * 40) + f" {i}" for i in range(30)]
    rng = np.random.default_rng(5)
    inp = base / "in"
    inp.mkdir()
    for k in range(3):
        part = caps[k::3]
        pq.write_table(
            pa.table(
                {
                    "URL": [f"http://example.com/{k}/{i}.jpg" for i in range(len(part))],
                    "TEXT": part,
                    "similarity": rng.uniform(0.1, 0.4, len(part)).astype("float32"),
                }
            ),
            inp / f"part-{k:05d}.parquet",
        )
    spec = PipelineSpec.model_validate(
        {
            "name": "registry",
            "input": {"paths": [str(inp)]},
            "output": {"dir": str(base / "run")},
            "score": {"source": "column", "column": "similarity"},
            "annotate": {"language": False},
            "selection": {"caption": {"max_words": 30}, "dedup": {"caption_exact": True}},
        }
    )
    result = run(spec, executor=LocalExecutor())
    assert result.ok, result.failed
    return base / "run", len(caps)


def _decisions(run: Path, name: str) -> pl.DataFrame:
    d = run / "selections" / name
    kept = pl.read_parquet(d / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    return pl.concat([kept, pl.read_parquet(d / "removed" / "*.parquet")], how="diagonal_relaxed")


def test_curate_run_applies_both_new_rules(scored_run):
    run, n = scored_run
    d = _decisions(run, "default")
    assert d.height == n
    reasons = d["reason"].value_counts()
    counts = dict(zip(reasons["reason"], reasons["count"]))
    too_long = d.filter(pl.col("caption_words") > 30)
    assert too_long.height >= 30 and counts.get("caption_length") == too_long.height  # the 41-word captions, + LAION's
    assert counts.get("duplicate_caption_exact", 0) >= 55  # the upper-cased copies (and LAION's own repeats)
    rep = json.loads((run / "selections" / "default" / "report.json").read_text())
    by_reason = {r["reason"]: r for r in rep["reasons"]}
    assert by_reason["duplicate_caption_exact"]["removed_first"] == counts["duplicate_caption_exact"]
    assert by_reason["duplicate_caption_exact"]["help"] == REASON_HELP[Reason.DUPLICATE_CAPTION_EXACT]
    assert rep["reconciles"] is True


def test_curate_select_flags_switch_the_new_rules(scored_run):
    run, n = scored_run
    res = CliRunner().invoke(
        app, ["select", str(run), "--name", "off", "--no-dedup-caption-exact", "--max-words", "100"]
    )
    assert res.exit_code == 0, res.output
    off = _decisions(run, "off")
    assert off.height == n and set(off["reason"].drop_nulls()) <= {"duplicate_url", "duplicate_uid"}
    res = CliRunner().invoke(app, ["select", str(run), "--name", "tight", "--max-words", "5", "--dedup-caption-exact"])
    assert res.exit_code == 0, res.output
    tight = _decisions(run, "tight")
    long = tight.filter(pl.col("caption_words") > 5)
    assert long.height > 100 and (long["reason"] == "caption_length").all()
    assert (tight["reason"] == "duplicate_caption_exact").sum() > 0
    recorded = json.loads((run / "manifest.json").read_text())["selection_specs"]["tight"]
    assert recorded["caption"]["max_words"] == 5 and recorded["dedup"]["caption_exact"] is True


def test_the_sweep_counts_the_new_rules_exactly(scored_run):
    run, _ = scored_run
    res = CliRunner().invoke(
        app, ["sweep", str(run), "--from", "0.1", "--to", "0.4", "--step", "0.05", "--out", str(run / "sw.csv")]
    )
    assert res.exit_code == 0, res.output
    table = pl.read_csv(run / "sw.csv").filter(pl.col("column") == "(all)")
    ann = pl.scan_parquet(str(run / "annotations" / "*.parquet"))
    m = json.loads((run / "manifest.json").read_text())
    sel = SelectionConfig.model_validate(m["spec"]["selection"])
    for t, kept in table.select("threshold", "kept").iter_rows():
        at = sel.model_copy(update={"clip": sel.clip.model_copy(update={"min_score": t})})
        assert kept == decide(ann, at)[0].collect()["kept"].sum(), t


def test_near_dedup_thresholds_from_the_command_line():
    """--caption-jaccard / --image-cosine set the near-dedup thresholds; 0 switches a step off."""
    from curate.config import SelectionConfig
    from curate.filters.rules import apply_flags

    base = SelectionConfig.model_validate({"dedup": {"caption_jaccard": 0.8, "image_cosine": 0.95}}).model_dump()
    on = SelectionConfig.model_validate(apply_flags(base, {"caption_jaccard": 0.6, "image_cosine": None}))
    assert (on.dedup.caption_jaccard, on.dedup.image_cosine) == (0.6, 0.95)
    base = SelectionConfig.model_validate({"dedup": {"caption_jaccard": 0.8, "image_cosine": 0.95}}).model_dump()
    off = SelectionConfig.model_validate(apply_flags(base, {"caption_jaccard": 0.0, "image_cosine": 0.0}))
    assert (off.dedup.caption_jaccard, off.dedup.image_cosine) == (None, None)
