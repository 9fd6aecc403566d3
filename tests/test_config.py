import pytest
from pydantic import ValidationError

from curate.config import PipelineSpec, SpecError, load_spec, parse_spec
from curate.presets import preset_names, preset_path

MINIMAL = {"name": "t", "input": {"paths": ["x.parquet"]}}


def test_unknown_key_is_an_error_that_names_it():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "selection": {"clip": {"min_scor": 0.3}}}, source="spec.toml")
    assert "spec.toml" in str(e.value)
    assert "selection.clip.min_scor" in str(e.value)


def test_unknown_top_level_section_is_an_error():
    with pytest.raises(SpecError, match="fetchh"):
        parse_spec({**MINIMAL, "fetchh": {}})


def test_clip_rule_takes_one_of_min_score_and_top_fraction():
    with pytest.raises(SpecError, match="not both"):
        parse_spec({**MINIMAL, "selection": {"clip": {"min_score": 0.3, "top_fraction": 0.3}}})


def test_a_clip_threshold_needs_a_score_source():
    with pytest.raises(SpecError, match="source = 'none'"):
        parse_spec({**MINIMAL, "score": {"source": "none"}, "selection": {"clip": {"min_score": 0.3}}})


def test_column_source_needs_a_column_name():
    with pytest.raises(SpecError, match="score.column"):
        parse_spec({**MINIMAL, "score": {"source": "column"}})


def test_every_preset_loads_and_has_a_source_comment():
    names = preset_names()
    assert {"demo", "laion400m", "laion2b_en", "datacomp_basic", "datacomp_clip_score", "laion_sample"} <= set(names)
    for name in names:
        path = preset_path(name)
        spec = load_spec(path)
        assert spec.name == name
        if name not in ("demo", "laion_sample"):
            assert "Source:" in path.read_text(), f"{name}.toml must cite its source"


def test_published_recipes_carry_their_thresholds():
    assert load_spec(preset_path("laion400m")).selection.clip.min_score == 0.30
    l2b = load_spec(preset_path("laion2b_en"))
    assert l2b.selection.clip.min_score == 0.28 and l2b.selection.language.allow == ["en"]
    basic = load_spec(preset_path("datacomp_basic")).selection
    assert (basic.caption.min_words, basic.caption.min_chars, basic.image.min_side, basic.image.max_aspect) == (
        3,
        6,
        200,
        3.0,
    )
    cs = load_spec(preset_path("datacomp_clip_score"))
    assert cs.selection.clip.top_fraction == 0.30 and cs.score.column == "clip_l14_similarity_score"


def test_overrides_are_validated():
    spec = PipelineSpec.model_validate(MINIMAL)
    assert spec.with_overrides(**{"output.dir": "/tmp/x"}).output.dir == "/tmp/x"
    with pytest.raises(SpecError, match="score.batch_size"):
        spec.with_overrides(**{"score.batch_size": 0})


def test_config_hash_changes_with_any_setting():
    a = PipelineSpec.model_validate(MINIMAL)
    b = a.with_overrides(**{"selection.clip.min_score": 0.25})
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == PipelineSpec.model_validate(MINIMAL).config_hash()


@pytest.mark.parametrize("key", ["deadline_s", "timeout_s", "retry_backoff_s", "max_retry_after_s"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_fetch_times_must_be_finite(key, value):
    # `fetch.deadline_s = inf` used to be accepted and killed the fetch watchdog thread (OverflowError)
    import tomllib

    raw = tomllib.loads(f'name = "t"\n[input]\npaths = ["x.parquet"]\n[fetch]\n{key} = {value}\n')
    with pytest.raises(SpecError, match=rf"fetch\.{key}: .*finite"):
        parse_spec(raw, source="spec.toml")


def test_fetch_deadline_has_an_upper_bound():
    # a finite deadline past the platform's time_t overflows the watchdog's wait just the same
    with pytest.raises(SpecError, match=r"fetch\.deadline_s"):
        parse_spec({**MINIMAL, "fetch": {"deadline_s": 1e10}})
    assert parse_spec({**MINIMAL, "fetch": {"deadline_s": 3600}}).fetch.deadline_s == 3600


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("fetch", "threads", "16"),
        ("fetch", "enabled", "off"),
        ("score", "batch_size", 64.0),
        ("selection", "clip", {"min_score": "0.3"}),
        ("annotate", "language", 1),
    ],
)
def test_spec_values_are_not_coerced_from_other_types(section, key, value):
    # strict specs: "16" is not an int and "off" not a bool (both used to be coerced silently)
    with pytest.raises(SpecError, match=rf"{section}\.{key}"):
        parse_spec({**MINIMAL, section: {key: value}})


def test_an_integer_is_still_a_float():
    assert parse_spec({**MINIMAL, "fetch": {"timeout_s": 5}}).fetch.timeout_s == 5.0


BASE_TOML = 'name = "t"\n[input]\npaths = ["x.parquet"]\n'


@pytest.mark.parametrize(
    "tables,keys,fix",
    [
        (
            "[selection.dedup]\ncaption_jaccard = 0.8\n",
            ["selection.dedup.caption_jaccard", "annotate.caption_minhash"],
            "[annotate]\ncaption_minhash = true\n",
        ),
        (
            "[selection.dedup]\nimage_cosine = 0.95\n",
            ["selection.dedup.image_cosine", "score.store_embeddings"],
            "[score]\nstore_embeddings = true\n",
        ),
        (
            "[fetch]\nenabled = false\n[selection.clip]\nmin_score = 0.3\n",
            ["selection.clip", "fetch.enabled"],
            '[score]\nsource = "column"\ncolumn = "similarity"\n',
        ),
        ("[fetch]\nprocesses = 4\n", ["fetch.processes"], None),
        (  # used at annotation time: it lives there now, recorded beside the band keys
            "[selection.dedup]\ncaption_ngram = 3\n",
            ["selection.dedup.caption_ngram", "annotate.caption_ngram"],
            None,
        ),
    ],
)
def test_settings_that_would_silently_do_nothing_are_refused_naming_the_keys(tmp_path, tables, keys, fix):
    """Each was accepted by `curate show-spec` and then did nothing (caption dedup without band
    keys; fetch.processes, never read), failed after the whole fetch and score (image dedup
    without embeddings), or made every row not_scored (a model with nothing fetched)."""
    from typer.testing import CliRunner

    from curate.cli import app

    spec = tmp_path / "spec.toml"
    spec.write_text(BASE_TOML + tables)
    res = CliRunner().invoke(app, ["show-spec", str(spec)])
    assert res.exit_code == 2, res.output
    for key in keys:
        assert key in res.output, (key, res.output)
    if fix is not None:  # with the missing piece, the same spec is accepted
        spec.write_text(BASE_TOML + tables + fix)
        res = CliRunner().invoke(app, ["show-spec", str(spec)])
        assert res.exit_code == 0, res.output


def test_the_old_dedup_engine_key_is_read_as_the_selection_engine():
    """Specs and recorded selections from before selection.engine said selection.dedup.engine."""
    from curate.config import SelectionConfig

    assert SelectionConfig.model_validate({"dedup": {"engine": "ray"}}).engine == "ray"
    assert SelectionConfig.model_validate({"engine": "ray", "dedup": {"engine": "local"}}).engine == "ray"
    assert SelectionConfig.model_validate({"engine": "auto", "dedup": {"engine": "ray"}}).engine == "auto"
    assert SelectionConfig.model_validate({"dedup": {"engine": "local"}}).engine == "local"
    dumped = SelectionConfig.model_validate({"dedup": {"engine": "ray", "partitions": 3}}).model_dump()
    assert dumped["engine"] == "ray" and "engine" not in dumped["dedup"] and dumped["dedup"]["partitions"] == 3
    with pytest.raises(ValidationError, match="use selection.engine"):
        SelectionConfig.model_validate({"dedup": {"engine": "spark"}})
    with pytest.raises(ValidationError, match="engine"):
        SelectionConfig.model_validate({"engine": "spark"})
    spec = PipelineSpec.model_validate({"name": "t", "input": {"paths": ["x"]}}).with_overrides(
        **{"selection.dedup.engine": "ray"}
    )
    assert spec.selection.engine == "ray"
