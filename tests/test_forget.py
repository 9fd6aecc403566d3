"""`curate forget`: rows deleted on request leave every derived artifact of a run directory,
are counted (kept + removed + forgotten == rows read, per shard and in total), are recorded in the
manifest without their identifiers, and never come back: not in a looser `curate select`, not in
a `curate run` that re-reads input shards."""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from curate.executor import LocalExecutor
from curate.cli import app
from curate.stages.annotate import normalize_url
from curate.stages.read import compute_uids

ROWS_PER_SHARD = 300


def _cli(*args: str, code: int = 0):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, res.output + (repr(res.exception) if res.exception else "")
    return res


def _selection(run: Path, name: str) -> pl.DataFrame:
    sel = run / "selections" / name
    kept = pl.read_parquet(sel / "kept" / "*.parquet").with_columns(pl.lit(True).alias("kept"))
    removed = pl.read_parquet(sel / "removed" / "*.parquet")
    return pl.concat([kept, removed], how="diagonal_relaxed")


def _assert_gone(
    run: Path,
    *,
    uids: set[str] = frozenset(),
    urls: set[str] = frozenset(),
    sha256: set[str] = frozenset(),
    rows: set[tuple[str, int]] = frozenset(),
) -> int:
    """No forgotten identifier in any parquet file (any string column) or text file of the run
    directory, and no forgotten (shard, row) in a per-shard file. forget/ holds the deletion list
    itself (uids, sha256 and hashed URLs) and is skipped. Returns the number of files checked."""
    needles = {x.lower() for x in uids} | {x.lower() for x in sha256} | set(urls)
    checked = 0
    for p in sorted(run.rglob("*")):
        if not p.is_file() or p.relative_to(run).parts[0] == "forget":
            continue
        checked += 1
        if p.suffix == ".parquet":
            df = pl.read_parquet(p)
            for name, dtype in df.schema.items():
                if dtype == pl.String:
                    vals = set(df.get_column(name).drop_nulls().to_list())
                    low = {v.lower() for v in vals}
                    assert not (vals & needles) and not (low & needles), (
                        f"{p}: column {name} holds forgotten identifiers"
                    )
            if "row" in df.columns and p.parent.name in (
                "annotations",
                "images",
                "embeddings",
                "_work",
                "kept",
                "removed",
            ):
                shard = df.get_column("shard")[0] if "shard" in df.columns and df.height else p.stem
                keys = {(shard, r) for r in df.get_column("row").to_list()}
                assert not (keys & set(rows)), f"{p}: holds forgotten rows"
        elif p.suffix in (".json", ".html", ".done", ".txt", ".csv"):
            text = p.read_text(errors="replace")
            low = text.lower()
            for n in needles:
                assert n not in text and n.lower() not in low and html.escape(n) not in text, (
                    f"{p}: mentions {n[:60]!r}"
                )
    return checked


def _check_counts(run: Path, name: str, rows_read: int, forgotten: int) -> dict:
    s = json.loads((run / "selections" / name / "selection.json").read_text())
    c = s["counts"]
    assert s["reconciles"] is True
    assert c["rows_read"] == rows_read and c["forgotten"] == forgotten, c
    assert c["kept"] + c["removed"] + c["forgotten"] == c["rows_read"]
    assert c["rows"] == c["kept"] + c["removed"]
    for shard, sc in s["shards"].items():
        assert sc["kept"] + sc["removed"] + sc["forgotten"] == sc["rows_read"], (shard, sc)
    rep = json.loads((run / "selections" / name / "report.json").read_text())
    assert rep["reconciles"] is True, rep["problems"]
    assert rep["totals"]["forgotten"] == forgotten and rep["totals"]["rows_read"] == rows_read
    assert rep["totals"]["rows_in"] + forgotten == rows_read
    d = _selection(run, name)
    assert d.height == rows_read - forgotten
    return s


@pytest.fixture(scope="module")
def laion_forget(tmp_path_factory, laion_sample, ray_session):
    tmp = tmp_path_factory.mktemp("forget")
    src = pl.read_parquet(laion_sample).head(2 * ROWS_PER_SHARD - 1)
    # the last row of part-1 repeats a part-0 image URL with a tracking parameter, another caption
    twin = src.slice(5, 1).with_columns(
        pl.when(pl.col("URL").str.contains("?", literal=True))
        .then(pl.col("URL") + "&utm_source=feed")
        .otherwise(pl.col("URL") + "?utm_source=feed"),
        pl.lit("another caption for this picture").alias("TEXT"),
    )
    src = pl.concat([src, twin])
    inp = tmp / "in"
    inp.mkdir()
    src.head(ROWS_PER_SHARD).write_parquet(inp / "part-0.parquet")
    src.tail(ROWS_PER_SHARD).write_parquet(inp / "part-1.parquet")
    run = tmp / "run"
    _cli("run", "laion_sample", "--input", str(inp), "--out", str(run))
    before = _selection(run, "default")
    ann = pl.read_parquet(run / "annotations" / "*.parquet")

    kept = before.filter(pl.col("kept")).sort("shard", "row")
    removed = before.filter(pl.col("kept").not_()).sort("shard", "row")
    # by URL: a kept row's URL with a tracking parameter added (matched through normalisation),
    # and a URL that part-1 repeats with a tracking parameter, given as it is
    dup_url = src["URL"][5]
    kept_url = kept.filter(pl.col("url") != dup_url)["url"][3]
    listed_urls = [kept_url + ("&" if "?" in kept_url else "?") + "utm_source=x", dup_url]
    norm = {normalize_url(u) for u in listed_urls}
    # by uid: two kept rows and one removed row (first and last: both shards), other URLs
    other = pl.col("url").map_elements(normalize_url, return_dtype=pl.String).is_in(list(norm)).not_()
    kept_o, removed_o = kept.filter(other), removed.filter(other)
    forget_uids = {kept_o["uid"][0], kept_o["uid"][-1], removed_o["uid"][0]}
    by_url = ann.filter(pl.col("url").is_in(listed_urls) | pl.col("url_normalized").is_in(list(norm)))
    by_uid = ann.filter(pl.col("uid").is_in(list(forget_uids)))
    forgotten = pl.concat([by_uid, by_url]).unique(["shard", "row"])
    assert by_url.height >= 3 and forgotten.height >= 6

    uid_file = tmp / "uids.txt"
    uid_file.write_text("# deletion request 1\n" + "\n".join(sorted(u.upper() for u in forget_uids)) + "\n\n")
    url_file = tmp / "urls.txt"
    url_file.write_text("\n".join(listed_urls) + "\n")
    r1 = _cli("forget", str(run), "--uids", str(uid_file))
    r2 = _cli("forget", str(run), "--urls", str(url_file))
    return {
        "tmp": tmp,
        "inp": inp,
        "run": run,
        "src": src,
        "forgotten": forgotten,
        "uids": set(forgotten["uid"]),
        "urls": set(by_url["url"]) | set(listed_urls),
        "uid_file": uid_file,
        "url_file": url_file,
        "out": (r1.output, r2.output),
        "n_by_uid": by_uid.height,
    }


def test_forgotten_rows_leave_every_artifact(laion_forget):
    f = laion_forget
    run = f["run"]
    assert f"forgot {f['n_by_uid']} row(s)" in f["out"][0] and "counts reconcile: yes" in f["out"][1]
    rows = {(s, r) for s, r in f["forgotten"].select("shard", "row").iter_rows()}
    checked = _assert_gone(run, uids=f["uids"], urls=f["urls"], rows=rows)
    assert checked > 20
    # the rows that were not forgotten are all still there, re-decided
    assert _selection(run, "default").height == 2 * ROWS_PER_SHARD - len(rows)
    keys = pl.read_parquet(run / "forget" / "keys.parquet")
    assert set(keys["kind"]) == {"uid", "url", "url_normalized"}
    # the run directory does not keep the raw URL list, only hashes
    assert not (set(keys["key"]) & f["urls"])


def test_counts_reconcile_with_forgotten_rows(laion_forget):
    f = laion_forget
    run = f["run"]
    s = _check_counts(run, "default", 2 * ROWS_PER_SHARD, f["forgotten"].height)
    per = f["forgotten"].group_by("shard").len()
    for shard, n in per.iter_rows():
        assert s["shards"][shard]["forgotten"] == n
    for shard in ("part-0", "part-1"):
        mk = json.loads((run / "annotations" / f"{shard}.done").read_text())
        assert mk["rows"] + mk["forgotten"] == mk["rows_read"] == ROWS_PER_SHARD
        assert mk["rows"] == pl.read_parquet(run / "annotations" / f"{shard}.parquet").height
    html_text = (run / "selections" / "default" / "report.html").read_text()
    assert "Forgotten" in html_text


def test_manifest_records_requests_without_identifiers(laion_forget):
    f = laion_forget
    m = json.loads((f["run"] / "manifest.json").read_text())
    reqs = m["forget_requests"]
    assert [r["kind"] for r in reqs] == ["uids", "urls"]
    assert reqs[0]["list_sha256"] == hashlib.sha256(f["uid_file"].read_bytes()).hexdigest()
    assert reqs[1]["list_sha256"] == hashlib.sha256(f["url_file"].read_bytes()).hexdigest()
    assert reqs[0]["entries"] == 3 and reqs[1]["entries"] == 2
    assert sum(r["rows_removed"] for r in reqs) == f["forgotten"].height
    assert reqs[0]["selections_rewritten"] == ["default"]
    assert m["counts"]["forgotten"] == f["forgotten"].height
    assert m["counts"]["rows"] + m["counts"]["forgotten"] == 2 * ROWS_PER_SHARD
    (lst,) = m["deletion_lists"]
    assert lst["sha256"] == hashlib.sha256((f["run"] / "forget" / "keys.parquet").read_bytes()).hexdigest()
    text = (f["run"] / "manifest.json").read_text()
    assert not any(u in text for u in f["urls"]) and not any(u in text for u in f["uids"])


def test_forget_is_idempotent(laion_forget):
    f = laion_forget
    res = _cli("forget", str(f["run"]), "--uids", str(f["uid_file"]))
    assert "forgot 0 row(s)" in res.output
    _check_counts(f["run"], "default", 2 * ROWS_PER_SHARD, f["forgotten"].height)


def test_looser_selection_keeps_them_out(laion_forget):
    f = laion_forget
    run = f["run"]
    _cli(
        "select",
        str(run),
        "--name",
        "loose",
        "--languages",
        "",
        "--min-language-confidence",
        "0",
        "--min-words",
        "0",
        "--min-chars",
        "0",
        "--no-dedup-url",
    )
    s = _check_counts(run, "loose", 2 * ROWS_PER_SHARD, f["forgotten"].height)
    assert s["counts"]["removed"] == 0  # nothing else removes a row under these rules
    rows = {(a, b) for a, b in f["forgotten"].select("shard", "row").iter_rows()}
    _assert_gone(run, uids=f["uids"], urls=f["urls"], rows=rows)
    m = json.loads((run / "manifest.json").read_text())
    assert m["selection_specs"]["loose"]["dedup"]["url"] is False


def test_rerun_rereading_inputs_keeps_them_out(laion_forget):
    """A rerun in the same run directory: part-1 lost its completion marker (so prepare_shard
    reads its input again) and a new input shard part-2 repeats forgotten rows."""
    f = laion_forget
    run, inp = f["run"], f["inp"]
    (run / "annotations" / "part-1.done").unlink()
    src = f["src"].with_columns(pl.Series("uid", compute_uids(f["src"]["URL"].to_list(), f["src"]["TEXT"].to_list())))
    again = src.filter(pl.col("URL").is_in(list(f["urls"]))).head(3)
    other = src.filter(pl.col("URL").is_in(list(f["urls"])).not_() & pl.col("uid").is_in(list(f["uids"])).not_()).head(
        20
    )
    extra = pl.concat([again, other]).drop("uid")
    extra.write_parquet(inp / "part-2.parquet")
    _cli("run", "laion_sample", "--input", str(inp), "--out", str(run))
    n_part2_forgotten = again.height
    total_read = 2 * ROWS_PER_SHARD + extra.height
    s = _check_counts(run, "default", total_read, f["forgotten"].height + n_part2_forgotten)
    assert s["shards"]["part-2"]["forgotten"] == n_part2_forgotten
    assert s["shards"]["part-1"]["forgotten"] == f["forgotten"].filter(pl.col("shard") == "part-1").height
    rows = {(a, b) for a, b in f["forgotten"].select("shard", "row").iter_rows()}
    _assert_gone(run, uids=f["uids"], urls=f["urls"], rows=rows)
    m = json.loads((run / "manifest.json").read_text())
    assert len(m["forget_requests"]) == 3  # the rerun kept the record (and the idempotent repeat)
    assert m["counts"]["rows"] + m["counts"]["forgotten"] == total_read


def test_forget_needs_exactly_one_list(laion_forget, tmp_path):
    res = CliRunner().invoke(app, ["forget", str(laion_forget["run"])])
    assert res.exit_code == 2 and "exactly one" in res.output
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-digest\n")
    res = CliRunner().invoke(app, ["forget", str(laion_forget["run"]), "--sha256", str(bad)])
    assert res.exit_code == 2 and "not a hex sha256" in res.output


# --- by image sha256, on a run that fetched and scored images (loopback servers, bundled CLIP) ----
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from curate.demo.data import SITES
    from curate.demo.image_server import ImageServer
    from curate.demo.run_demo import demo_spec, write_inputs
    from curate.runner import run

    out = tmp_path_factory.mktemp("forget_demo")
    with contextlib.ExitStack() as stack:
        servers = {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}
        write_inputs(out, 90, 2, 3, servers)
        spec = demo_spec(out).with_overrides(**{"score.store_embeddings": True, "output.overwrite": False})
        result = run(spec, executor=LocalExecutor())  # forget is under test, not where shards run
        assert result.ok, result.failed
        yield {"run": Path(result.run_dir), "spec": spec, "servers": servers}


def test_forget_by_image_sha256(demo_run, tmp_path):
    run = demo_run["run"]
    ann = pl.read_parquet(run / "annotations" / "*.parquet")
    before = _selection(run, "default")
    assert (run / "embeddings").exists() and (run / "images").exists()
    # two images, one of them served for more than one row if the demo has such a duplicate
    counts = (
        ann.filter(pl.col("image_sha256").is_not_null())
        .group_by("image_sha256")
        .len()
        .sort(["len", "image_sha256"], descending=[True, False])
    )
    kept_sha = before.filter(pl.col("kept") & pl.col("image_sha256").is_not_null()).sort("shard", "row")[
        "image_sha256"
    ][0]
    digests = sorted({counts["image_sha256"][0], kept_sha})
    gone = ann.filter(pl.col("image_sha256").is_in(digests))
    gone = ann.filter(
        pl.col("image_sha256").is_in(digests).fill_null(False) | pl.col("uid").is_in(gone["uid"].to_list())
    )
    rows = {(a, b) for a, b in gone.select("shard", "row").iter_rows()}
    assert len(rows) >= 2
    lst = tmp_path / "sha.txt"
    lst.write_text("\n".join(d.upper() for d in digests) + "\n")
    total = ann.height
    _cli("forget", str(run), "--sha256", str(lst))
    remaining_urls = set(ann.join(gone.select("shard", "row"), on=["shard", "row"], how="anti")["url"])
    _assert_gone(run, uids=set(gone["uid"]), sha256=set(digests), urls=set(gone["url"]) - remaining_urls, rows=rows)
    _check_counts(run, "default", total, len(rows))
    for sub in ("images", "embeddings"):
        for p in (run / sub).glob("*.parquet"):
            left = {(p.stem, r) for r in pl.read_parquet(p)["row"].to_list()}
            assert not (left & rows)
    # a rerun with a looser spec fetches skipped rows again; a forgotten image stays out
    from curate.runner import run as run_pipeline

    looser = demo_run["spec"].with_overrides(**{"selection.language.allow": [], "selection.caption.min_words": 0})
    res = run_pipeline(looser, executor=LocalExecutor())
    assert res.ok, res.failed
    _assert_gone(run, sha256=set(digests), rows=rows)
    s = json.loads((run / "selections" / "default" / "selection.json").read_text())
    assert (
        s["reconciles"]
        and s["counts"]["kept"] + s["counts"]["removed"] + s["counts"]["forgotten"] == s["counts"]["rows_read"]
    )
    m = json.loads((run / "manifest.json").read_text())
    assert m["forget_requests"][-1]["kind"] == "sha256"
    assert m["model"]["preprocess"]["config"]["size"] in (64, [64, 64])  # the bundled model: 64 px square


def test_overwrite_discards_the_run_not_the_deletion_requests(laion_forget):
    """`curate run --overwrite` re-reads every input shard: the forgotten rows stay out."""
    f = laion_forget
    run = f["run"]
    _cli("run", "laion_sample", "--input", str(f["inp"]), "--out", str(run), "--overwrite")
    s = json.loads((run / "selections" / "default" / "selection.json").read_text())
    assert s["reconciles"] and s["counts"]["forgotten"] >= f["forgotten"].height
    assert s["counts"]["kept"] + s["counts"]["removed"] + s["counts"]["forgotten"] == s["counts"]["rows_read"]
    rows = {(a, b) for a, b in f["forgotten"].select("shard", "row").iter_rows()}
    _assert_gone(run, uids=f["uids"], urls=f["urls"], rows=rows)
    m = json.loads((run / "manifest.json").read_text())
    assert [r["kind"] for r in m["forget_requests"]][:2] == ["uids", "urls"] and m["deletion_lists"]


def test_report_rebuild_keeps_the_forgotten_count(laion_forget):
    f = laion_forget
    res = _cli("report", str(f["run"]), "--selection", "default")
    assert "counts reconcile: yes" in res.output
    rep = json.loads((f["run"] / "selections" / "default" / "report.json").read_text())
    assert rep["reconciles"] and rep["totals"]["forgotten"] >= f["forgotten"].height
    assert rep["totals"]["rows_in"] + rep["totals"]["forgotten"] == rep["totals"]["rows_read"]
