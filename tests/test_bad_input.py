"""Bad inputs: nothing lost, ever, and every bad input a clear error (the issue's cases 5, 6, 7, 8,
10, 11 and 14). End to end on real Ray where the bug shows only there (a zero-row shard, null
URLs and repeated uids, bad uid / UTF-8 / dictionary columns); the rest on the functions the
pipeline itself calls."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.executor import LocalExecutor
from curate.cli import app
from curate.config import (
    LanguageRule,
    PipelineSpec,
    SelectionConfig,
    SpecError,
    parse_spec,
)
from curate.stages.read import ShardReadError, read_shard

WORDS = ["a", "photo", "of", "the", "red", "dog", "on", "green", "grass", "near", "house", "with", "blue", "sky"]


def _uid(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))) for _ in range(n)]


def _decisions(run) -> pl.DataFrame:
    sel = run / "selections" / "default"
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed")


# --- (5) fetch on, no text rule: the fetch mask has one value per row -------------------------------
def _annotated(urls: list[str | None]) -> pl.DataFrame:
    n = len(urls)
    return pl.DataFrame(
        {
            "row": list(range(n)),
            "url": urls,
            "language": ["en"] * n,
            "language_score": [0.9] * n,
            "caption_words": [5] * n,
            "caption_chars": [30] * n,
        }
    )


def test_fetch_mask_without_text_rules_has_one_value_per_row():
    from curate.filters import rules

    sel = SelectionConfig(clip={"min_score": 0.2})  # a pure CLIP-threshold selection: no language or caption rule
    frame = _annotated(["http://a.test/1.jpg", "https://b.test/2.jpg", None, "  ", "http://c.test/3.jpg"])
    # what prepare_shard evaluated before (ann.select(...).to_series()): a literal, one value
    assert frame.select(rules.text_rules_pass(sel)).to_series().len() == frame.height
    text_rules_mask = rules.text_rules_mask
    mask = text_rules_mask(frame, sel)  # what prepare_shard evaluates now
    assert mask.dtype == pl.Boolean and mask.to_list() == [True, True, False, False, True]
    # the rerun path: rows an earlier run skipped, and only those
    again = text_rules_mask(frame, sel, where=pl.col("row") >= 3)
    assert again.to_list() == [False, False, False, False, True]
    # text rules still apply when they are on
    strict = SelectionConfig(language={"allow": ["de"]})
    assert text_rules_mask(frame, strict).to_list() == [False] * 5


def test_pure_clip_threshold_spec_prepares_a_shard_with_fetch_on(tmp_path):
    """prepare_shard, fetch_window and finish_windows themselves (the Ray tasks' bodies) with fetch on
    and only a CLIP threshold. The URLs
    are refused before any connection (loopback / private addresses, a non-http scheme), so nothing
    reaches the network and nothing needs the model; a null URL is never fetched."""
    from curate.shard_jobs import fetch_window, finish_windows, prepare_shard

    urls = ["http://127.0.0.1:9/a.jpg", "http://10.255.255.1/b.jpg", "ftp://example.test/c.jpg", None]
    src = tmp_path / "in" / "part-0.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "text": _captions(4, 0)}), src)
    spec = PipelineSpec.model_validate(
        {
            "name": "clip_only",
            "input": {"paths": [str(src)]},
            "output": {"dir": str(tmp_path / "run")},
            "annotate": {"language": False},
            "fetch": {"retries": 0, "deadline_s": 5.0},
            "selection": {"clip": {"min_score": 0.2}},
        }
    )
    assert spec.needs_images and spec.score.source == "model"
    run_dir, js = str(tmp_path / "run"), spec.model_dump_json()
    res = prepare_shard(str(src), js, run_dir)
    assert res["state"] == "fetch" and res["windows"] == 1 and res["rows"] == 4
    assert res["counts"]["fetch_attempted"] == 3
    got = fetch_window(run_dir, "part-0", 0, js)
    assert got["fetched"] == 3 and got["ok"] == 0  # nothing to score: the shard is finished next
    res = finish_windows(run_dir, "part-0", js, 1, res["counts"])
    assert res["state"] == "done" and res["rows"] == 4 and res["fetch_ok"] == 0
    ann = pl.read_parquet(tmp_path / "run" / "annotations" / "part-0.parquet").sort("row")
    assert ann["fetch_status"].to_list() == ["blocked_address", "blocked_address", "bad_url", "not_attempted"]
    assert (tmp_path / "run" / "annotations" / "part-0.done").exists()


# --- (6) a zero-row shard, (7) null URLs and repeated uids: fetch off, real Ray ------------------------
N1, N2 = 40, 30


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """part-0: zero rows. part-1 (DataComp layout, own uids): null and empty URLs, uids repeated
    with different URLs, an exact repeat of a row. part-2 (LAION layout, computed uids): null-URL
    rows that are equal, so their computed uids are equal too."""
    from curate.runner import run

    d = tmp_path_factory.mktemp("messy")
    inp = d / "in"
    inp.mkdir()
    empty = pa.table(
        {"uid": pa.array([], pa.string()), "url": pa.array([], pa.string()), "text": pa.array([], pa.string())}
    )
    pq.write_table(empty, inp / "part-0.parquet")

    caps = _captions(N1, 1)
    uids = [_uid(f"p1-{i}") for i in range(N1)]
    urls: list[str | None] = [f"https://img.example.com/p1/{i}.jpg" for i in range(N1)]
    urls[3] = urls[7] = urls[11] = None
    urls[5], urls[9] = "", "   "
    uids[21] = uids[20]  # same uid, other URL and caption
    uids[22] = uids[20]
    uids[31] = uids[30].upper()  # the same uid in another case (the read stage lower-cases uids)
    urls[35], caps[35], uids[35] = urls[34], caps[34], uids[34]  # an exact repeat of a row
    uids[12] = uids[3]  # a null-URL row's uid on a row with a URL
    pq.write_table(pa.table({"uid": uids, "url": pa.array(urls, pa.string()), "text": caps}), inp / "part-1.parquet")

    caps2 = _captions(N2, 2)
    urls2: list[str | None] = [f"https://img.example.com/p2/{i}.jpg" for i in range(N2)]
    for i in (4, 5, 6):
        urls2[i], caps2[i] = None, "the same caption on three rows without a URL"
    urls2[10] = None
    pq.write_table(pa.table({"URL": pa.array(urls2, pa.string()), "TEXT": caps2}), inp / "part-2.parquet")

    # uid 20's copies (rows 21, 22) and row 1-31 are also repeated by another shard
    pq.write_table(
        pa.table(
            {
                "uid": [uids[20], uids[30]],
                "url": ["https://img.example.com/p3/a.jpg", "https://img.example.com/p3/b.jpg"],
                "text": ["red dog on the grass", "blue sky near the house"],
            }
        ),
        inp / "part-3.parquet",
    )

    out = d / "run"
    spec = PipelineSpec.model_validate(
        {
            "name": "messy",
            "input": {"paths": [str(inp)]},
            "output": {"dir": str(out)},
            "fetch": {"enabled": False},
            "score": {"source": "none"},
            "selection": {"dedup": {"url": True, "image_sha256": False}},
        }
    )
    result = run(spec, executor=LocalExecutor())  # the input is under test, not where shards run
    return out, result, {"part-0": 0, "part-1": N1, "part-2": N2, "part-3": 2}


def test_zero_row_shard_completes_and_reconciles(messy_run):
    out, result, rows = messy_run
    assert result.failed == {}, result.failed
    assert sorted(result.shards_done) == sorted(rows)
    marker = json.loads((out / "annotations" / "part-0.done").read_text())
    assert marker["rows"] == 0 and marker["fetch_status"] == {}
    assert pl.read_parquet(out / "annotations" / "part-0.parquet").height == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (
        m["state"] == "complete" and m["counts"]["shards_complete"] == 4 and m["counts"]["rows"] == sum(rows.values())
    )
    summary = json.loads((out / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] is True
    assert summary["counts"]["rows_read"] == sum(rows.values())
    assert summary["shards"]["part-0"]["rows_read"] == 0
    assert summary["counts"]["kept"] + summary["counts"]["removed"] == sum(rows.values())


def test_null_urls_are_removed_as_missing_url(messy_run):
    out, _, _ = messy_run
    d = _decisions(out)
    no_url = pl.col("url").is_null() | (pl.col("url").str.strip_chars() == "")
    assert d.filter(no_url).height == 9  # 3 null + 2 empty/blank in part-1, 4 null in part-2
    assert d.filter(no_url & pl.col("kept")).height == 0
    assert set(d.filter(no_url)["reason"]) == {"missing_url"}
    assert d.filter(~no_url & (pl.col("reason") == "missing_url")).height == 0
    rep = json.loads((out / "selections" / "default" / "report.json").read_text())
    assert {r["reason"]: r["removed_first"] for r in rep["reasons"]}["missing_url"] == 9
    assert rep["reconciles"] is True


def test_kept_uids_are_unique_and_the_uid_file_has_one_entry_per_kept_row(messy_run):
    out, _, rows = messy_run
    d = _decisions(out)
    kept = d.filter(pl.col("kept"))
    assert d.height == sum(rows.values())
    assert kept["uid"].n_unique() == kept.height
    uids = np.load(out / "selections" / "default" / "uids.npy")
    assert len(uids) == kept.height
    as_hex = {f"{int(hi):016x}{int(lo):016x}" for hi, lo in uids}
    assert as_hex == set(kept["uid"])
    dup = d.filter(pl.col("reason") == "duplicate_uid")
    # uid 20 x 4 (3 in part-1, 1 in part-3) and uid 30 x 3 (2 in part-1, one upper-cased; 1 in
    # part-3): 3 + 2 copies removed; row 34/35 is an exact repeat, caught first by duplicate_url;
    # row 12 shares a uid with a null-URL row, which is removed as missing_url, so row 12 stays
    assert dup.height == 5
    assert (dup["duplicate_of"] == dup["uid"]).all()
    assert set(dup["duplicate_of"]) <= set(kept["uid"])
    p1 = d.filter(pl.col("shard") == "part-1").sort("row")
    assert p1.row(35, named=True)["reason"] == "duplicate_url" and p1.row(12, named=True)["kept"]
    summary = json.loads((out / "selections" / "default" / "selection.json").read_text())
    assert summary["counts"]["kept"] == kept.height == summary["counts"]["kept_unique_uids"]


def test_duplicate_uid_runs_last_and_every_duplicate_names_a_kept_uid():
    """decide() on annotations: A and B share a URL (B loses duplicate_url to A); C has A's uid and
    a better score, so A loses duplicate_uid to C. B still names a kept uid; D has no URL."""
    from curate.filters.decide import decide

    from curate.annotations import conform

    u1, u2, u3 = _uid("1"), _uid("2"), _uid("3")
    rows = pa.Table.from_pylist(
        [
            {
                "shard": "s",
                "row": 0,
                "uid": u1,
                "url": "http://a.test/x.jpg",
                "url_normalized": "http://a.test/x.jpg",
                "clip_score": 0.5,
            },
            {
                "shard": "s",
                "row": 1,
                "uid": u2,
                "url": "http://a.test/x.jpg",
                "url_normalized": "http://a.test/x.jpg",
                "clip_score": 0.3,
            },
            {
                "shard": "s",
                "row": 2,
                "uid": u1,
                "url": "http://b.test/y.jpg",
                "url_normalized": "http://b.test/y.jpg",
                "clip_score": 0.9,
            },
            {"shard": "s", "row": 3, "uid": u3, "url": None, "url_normalized": None, "clip_score": None},
        ]
    )
    ann = pl.from_arrow(conform(rows)).with_columns(pl.lit("not_needed").alias("fetch_status")).lazy()
    d = decide(ann, SelectionConfig(clip={"min_score": 0.1}, dedup={"image_sha256": False}))[0].collect().sort("row")
    assert d["reason"].to_list() == ["duplicate_uid", "duplicate_url", None, "missing_url"]
    assert d["duplicate_of"].to_list() == [u1, u1, None, None]
    kept = set(d.filter(pl.col("kept"))["uid"])
    assert d.filter(pl.col("kept"))["uid"].is_unique().all()
    assert set(d.filter(pl.col("duplicate_of").is_not_null())["duplicate_of"]) <= kept
    assert d["reasons"][3].to_list() == ["missing_url"]  # never fetched, but not "not_scored": it never will be


# --- (10) language codes: the model's labels, any case; others refused by name -----------------------
def _spec(allow) -> PipelineSpec:
    return parse_spec({"name": "l", "input": {"paths": ["x.parquet"]}, "selection": {"language": {"allow": allow}}})


def test_language_codes_are_normalised_to_the_models_form():
    assert _spec(["EN", " De ", "zh", "en"]).selection.language.allow == ["en", "de", "zh"]
    assert LanguageRule(allow=["ALS", "Yue"]).allow == ["als", "yue"]


@pytest.mark.parametrize("bad", ["english", "", "en-US", "xx"])
def test_unknown_language_codes_are_refused_by_name(bad):
    with pytest.raises(SpecError) as e:
        _spec(["en", bad])
    msg = str(e.value)
    assert "selection.language.allow" in msg and f"unknown language code(s) {bad!r}" in msg and "'en'" in msg


def test_the_accepted_codes_are_exactly_the_language_models_labels():
    from curate.stages.annotate import _detector

    model = _detector()._get_model(low_memory=True, fallback_on_memory_error=False)  # the `lite` model annotate uses
    labels, _ = model.predict("a photo of a dog", k=-1, threshold=-1.0)
    assert {label.removeprefix("__label__") for label in labels} == LanguageRule.model_codes()
    assert len(LanguageRule.model_codes()) == 176


def test_select_with_an_upper_case_code_keeps_rows_and_a_bad_code_fails(messy_run):
    out, _, _ = messy_run
    ok = CliRunner().invoke(app, ["select", str(out), "--name", "upper", "--languages", "EN"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((out / "selections" / "upper" / "selection.json").read_text())
    assert summary["rules"]["language"]["allow"] == ["en"] and summary["counts"]["kept"] > 0
    bad = CliRunner().invoke(app, ["select", str(out), "--name", "bad", "--languages", "english"])
    assert bad.exit_code == 2 and "'english'" in bad.output and "unknown language code" in bad.output
    assert not (out / "selections" / "bad").exists()


# --- (14) `curate forget` lists are validated ---------------------------------------------------------
def test_forget_lists_are_validated(tmp_path):
    from curate.deletions import parse_list

    junk = bytes(range(256)) * 4
    with pytest.raises(ValueError, match=r"junk\.bin: not a UTF-8 text file"):
        parse_list(junk, "urls", "junk.bin")
    with pytest.raises(ValueError, match=r"junk\.bin: not a UTF-8 text file"):
        parse_list(junk, "uids", "junk.bin")
    with pytest.raises(ValueError, match=r"urls\.txt:3: not an http\(s\) URL: 'ftp://x\.test/a\.jpg'"):
        parse_list(b"# request 7\nhttps://a.test/1.jpg\nftp://x.test/a.jpg\n", "urls", "urls.txt")
    with pytest.raises(ValueError, match=r"urls\.txt:1: not an http\(s\) URL"):
        parse_list(b"just some words\n", "urls", "urls.txt")
    with pytest.raises(ValueError, match=r"uids\.txt:2: not a uid \(32 hex characters\): 'xyz'"):
        parse_list(f"{_uid('a')}\nxyz\n".encode(), "uids", "uids.txt")
    with pytest.raises(ValueError, match=r"uids\.txt:1: not a uid"):
        parse_list((_uid("a") + "0").encode(), "uids", "uids.txt")
    # what is valid still parses: a BOM, comments, blank lines, upper-case uids, IRIs
    assert parse_list("\ufeffhttps://a.test/1.jpg\n\n# c\nHTTP://B.test/ü.jpg\n".encode(), "urls") == [
        "https://a.test/1.jpg",
        "HTTP://B.test/ü.jpg",
    ]
    assert parse_list(_uid("a").upper().encode() + b"\r\n", "uids") == [_uid("a")]


def test_forget_with_a_binary_list_fails_naming_it_and_changes_nothing(messy_run, tmp_path):
    out, _, _ = messy_run
    junk = tmp_path / "list.bin"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    res = CliRunner().invoke(app, ["forget", str(out), "--urls", str(junk)])
    assert res.exit_code == 2 and "list.bin" in res.output and "not a UTF-8 text file" in res.output
    assert not (out / "forget").exists()


# --- (8) uids, (11) invalid UTF-8, (14) dictionary columns: the read stage ---------------------------
def test_read_refuses_non_hex_or_wrong_length_uids_naming_file_and_column(tmp_path):
    p = tmp_path / "part-0.parquet"
    good = _uid("ok")
    pq.write_table(
        pa.table(
            {
                "uid": [good, "xyz", good[:31], good + "0", "g" * 32, good.upper()],
                "url": [f"http://a.test/{i}.jpg" for i in range(6)],
                "text": ["t"] * 6,
            }
        ),
        p,
    )
    with pytest.raises(ShardReadError) as e:
        read_shard(str(p), PipelineSpec.model_validate({"name": "u", "input": {"paths": [str(p)]}}).input)
    assert str(e.value).startswith(f"{p}: column 'uid': 4 value(s) are not 32-character hex uids, e.g. 'xyz'")


def test_read_names_file_and_column_of_invalid_utf8(tmp_path):
    p = tmp_path / "part-0.parquet"
    caps = pa.array([b"a fine caption", b"bad \xc3\x28 caption", b"\xff\xfe"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"url": ["http://a.test/1.jpg"] * 3, "text": caps}), p)
    with pytest.raises(ShardReadError) as e:
        read_shard(str(p), PipelineSpec.model_validate({"name": "u", "input": {"paths": [str(p)]}}).input)
    assert str(e.value).startswith(f"{p}: column 'text': 2 value(s) are not valid UTF-8, first at row 1")


def test_read_decodes_dictionary_encoded_columns(tmp_path):
    p = tmp_path / "cat.parquet"
    pd.DataFrame(
        {
            "URL": pd.Categorical(["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/1.jpg"]),
            "TEXT": pd.Categorical(["a red dog", "a blue sky", "a red dog"]),
        }
    ).to_parquet(p)
    assert pa.types.is_dictionary(pq.read_schema(p).field("TEXT").type)
    t = read_shard(str(p), PipelineSpec.model_validate({"name": "c", "input": {"paths": [str(p)]}}).input)
    assert t.column("url").type == pa.string() and t.column("caption").type == pa.string()
    assert t.column("caption").to_pylist() == ["a red dog", "a blue sky", "a red dog"]


@pytest.fixture(scope="module")
def bad_shards_run(tmp_path_factory, ray_session):
    """Through the CLI: a categorical shard (must work), a shard with non-hex uids and one with
    invalid UTF-8 (each must fail alone, naming its file and column, before anything is written)."""
    d = tmp_path_factory.mktemp("badshards")
    inp = d / "in"
    inp.mkdir()
    n = 25
    caps = _captions(n, 3)
    pd.DataFrame(
        {
            "uid": [_uid(f"c{i}") for i in range(n)],
            "url": pd.Categorical([f"https://img.example.com/c/{i % 20}.jpg" for i in range(n)]),
            "text": pd.Categorical(caps),
        }
    ).to_parquet(inp / "part-0.parquet")
    pq.write_table(
        pa.table(
            {
                "uid": [_uid("u0"), "not-a-uid", _uid("u2"), "12345"],
                "url": [f"https://img.example.com/u/{i}.jpg" for i in range(4)],
                "text": _captions(4, 4),
            }
        ),
        inp / "part-1.parquet",
    )
    bad_text = pa.array([b"a red dog", b"caf\xe9 latte"], pa.binary()).view(pa.string())
    pq.write_table(
        pa.table(
            {
                "uid": [_uid("t0"), _uid("t1")],
                "url": ["https://img.example.com/t/0.jpg", "https://img.example.com/t/1.jpg"],
                "text": bad_text,
            }
        ),
        inp / "part-2.parquet",
    )
    spec = d / "spec.toml"
    spec.write_text(
        'name = "bad"\n[input]\npaths = ["x"]\n[fetch]\nenabled = false\n[score]\nsource = "none"\n'
        "[annotate]\nlanguage = false\n[selection]\ndedup = { url = true, image_sha256 = false }\n"
    )
    out = d / "run"
    res = CliRunner().invoke(app, ["run", str(spec), "--input", str(inp), "--out", str(out)])
    return out, res, n


def test_non_hex_uids_fail_their_shard_naming_file_and_column(bad_shards_run):
    out, res, _ = bad_shards_run
    assert res.exit_code == 1, res.output
    assert "part-1.parquet: column 'uid': 2 value(s) are not 32-character hex uids, e.g. 'not-a-uid'" in res.output
    assert "invalid literal" not in res.output
    m = json.loads((out / "manifest.json").read_text())
    assert "part-1.parquet: column 'uid'" in m["failed_shards"]["part-1"]
    assert m["unaccounted_rows"]["part-1"] == 4
    assert not (out / "annotations" / "part-1.parquet").exists()


def test_invalid_utf8_fails_its_shard_naming_file_and_column(bad_shards_run):
    out, res, _ = bad_shards_run
    assert "part-2.parquet: column 'text': 1 value(s) are not valid UTF-8, first at row 1" in res.output
    assert "UnicodeDecodeError" not in res.output
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["failed_shards"]) == ["part-1", "part-2"]
    assert not (out / "annotations" / "part-2.parquet").exists()


def test_dictionary_encoded_shard_is_read_and_selected(bad_shards_run):
    out, _, n = bad_shards_run
    m = json.loads((out / "manifest.json").read_text())
    assert "part-0" not in m["failed_shards"] and m["counts"]["rows"] == n
    d = _decisions(out)
    assert d.height == n and set(d["shard"]) == {"part-0"}
    assert d.filter(pl.col("reason") == "duplicate_url").height == 5  # 25 rows over 20 URLs
    summary = json.loads((out / "selections" / "default" / "selection.json").read_text())
    assert summary["reconciles"] is True and summary["counts"]["kept"] == 20
