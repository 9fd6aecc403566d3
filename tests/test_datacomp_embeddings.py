"""DataComp's precomputed embeddings (input.embeddings, curate/datacomp_embeddings.py): a CommonPool-
format pool (metadata parquet + <shard>.npz with l14_img/l14_txt/b32_img/b32_txt, float16,
row-aligned) read without fetching gives the same concept tags and image near-duplicate decisions as
the run that fetched and embedded those images; a misaligned npz is refused naming the file.

The pool is made from the demo run (tests/conftest.py demo_run): its cached images and their
captions encoded by the bundled model through the scorer's own code (curate/stages/score.py), as
DataComp encoded CommonPool with OpenAI's CLIP.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate import annotations, concepts, manifest, store
from curate.config import SelectionConfig, SpecError, parse_spec
from curate.datacomp_embeddings import EmbeddingsMismatch, npz_path, shard_embeddings
from curate.executor import LocalExecutor
from curate.runner import run
from curate.selection import write_selection
from curate.stages.score import ClipScorer

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown"]
# the rules both runs are compared under: concept tags and image near-duplicates, nothing that
# needs a fetch (no URL or byte dedup, no perceptual hash), no text rule
RULES = {
    "clip": {},
    "language": {"allow": []},
    "caption": {},
    "image": {},
    "dedup": {"url": False, "image_sha256": False, "image_cosine": 0.95},
    "concepts": {
        "red": {
            "prompts": ["a red shape"],
            "negatives": [f"a {c} shape" for c in COLORS if c != "red"],
            "min_similarity": 0.5,
        },
        "star": {"prompts": ["a star"], "top_fraction": 0.2},
    },
}


@pytest.fixture(scope="module")
def pool(demo_run, tmp_path_factory):
    """metadata/<shard>.parquet + <shard>.npz for the demo rows with a cached image."""
    run_dir = demo_run["run"]
    out = tmp_path_factory.mktemp("datacomp") / "metadata"
    out.mkdir()
    scorer = ClipScorer(demo_run["spec"].score)  # the run's model, precision and batch size
    for shard in annotations.completed_shards(str(run_dir)):
        ann = pl.read_parquet(annotations.shard_path(str(run_dir), shard))
        images = pl.read_parquet(store.images_path(str(run_dir), shard)).select("row", "jpg")
        rows = ann.join(images, on="row").filter(pl.col("fetch_status") == "ok").sort("row")
        scores, img, _ = scorer.score_for_dedup(rows["jpg"].to_list(), rows["caption"].to_list())
        assert not np.isnan(scores).any()
        txt = scorer.encode_texts(rows["caption"].to_list()).numpy().astype(np.float16)
        pl.DataFrame(
            {
                "uid": rows["uid"],
                "url": rows["url"],
                "text": rows["caption"],
                "original_width": rows["original_width"],
                "original_height": rows["original_height"],
                "clip_b32_similarity_score": scores,
                "clip_l14_similarity_score": scores,
            }
        ).write_parquet(out / f"{shard}.parquet")
        np.savez(out / f"{shard}.npz", l14_img=img, l14_txt=txt, b32_img=img, b32_txt=txt)
    return out


def _spec(pool: Path, out: Path, **input_extra):
    return parse_spec(
        {
            "name": "datacomp-npz",
            "input": {
                "paths": [str(pool)],
                "layout": "datacomp",
                "embeddings": {"key": "l14", "model": "curate-tiny", "pretrained": "bundled"},
                **input_extra,
            },
            "output": {"dir": str(out)},
            "fetch": {"enabled": False},
            "score": {"source": "column", "column": "clip_l14_similarity_score"},
            "selection": {"name": "default", **RULES},
        }
    )


@pytest.fixture(scope="module")
def npz_run(pool, tmp_path_factory):
    spec = _spec(pool, tmp_path_factory.mktemp("npz-run") / "run")
    res = run(spec, executor=LocalExecutor())
    assert res.ok, res.failed
    return Path(res.run_dir)


def _decisions(sel: Path) -> pl.DataFrame:
    kept = pl.read_parquet(sel / "kept" / "*.parquet")
    rows = pl.concat([kept, pl.read_parquet(sel / "removed" / "*.parquet")], how="diagonal_relaxed")
    return rows.with_columns(pl.col("reasons").fill_null(pl.lit([], pl.List(pl.String)))).sort("uid")


def test_the_npz_run_tags_and_dedups_as_the_run_that_fetched(demo_run, pool, npz_run):
    fetched = demo_run["run"]
    write_selection(str(fetched), SelectionConfig.model_validate({"name": "as-npz", **RULES}), demo_run["spec"].report)
    a = _decisions(fetched / "selections" / "as-npz")
    b = _decisions(npz_run / "selections" / "default")
    m = manifest.read(str(npz_run))
    assert m["counts"]["fetch_status"] == {"not_needed": b.height}  # nothing was fetched
    pool_uids = set(b["uid"])
    a = a.filter(pl.col("uid").is_in(list(pool_uids)))
    assert a.height == b.height >= 250

    # the embeddings: the same images' float16 encodings, up to float16 rounding
    ea = annotations.scan_embeddings(str(fetched)).collect()
    eb = annotations.scan_embeddings(str(npz_run)).collect()
    ids = pl.concat(
        [
            pl.read_parquet(annotations.shard_path(str(r), s)).select("shard", "row", "uid")
            for r in (fetched,)
            for s in annotations.completed_shards(str(r))
        ]
    )
    ea = ea.join(ids, on=["shard", "row"]).sort("uid")
    ids_b = pl.concat(
        [
            pl.read_parquet(annotations.shard_path(str(npz_run), s)).select("shard", "row", "uid")
            for s in annotations.completed_shards(str(npz_run))
        ]
    )
    eb = eb.join(ids_b, on=["shard", "row"]).sort("uid")
    ea = ea.filter(pl.col("uid").is_in(list(pool_uids)))
    assert ea["uid"].to_list() == eb["uid"].to_list()
    xa = np.array(ea["image_embedding"].to_list(), dtype=np.float32)
    xb = np.array(eb["image_embedding"].to_list(), dtype=np.float32)
    assert np.abs(xa - xb).max() <= 2**-10  # float16's spacing at 1: the encodings agree to its rounding

    # the same concept scores (to float16 rounding), tags and image near-duplicate decisions
    for name in RULES["concepts"]:
        col = concepts.column(name)
        assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-3), name
        tag = concepts.reason(name)
        assert a["reasons"].list.contains(tag).to_list() == b["reasons"].list.contains(tag).to_list(), name
        assert b["reasons"].list.contains(tag).sum() > 0, name
    near = pl.col("reason") == "duplicate_image_near"
    pairs_a = a.filter(near).select("uid", "duplicate_of").rows()
    pairs_b = b.filter(near).select("uid", "duplicate_of").rows()
    assert pairs_a == pairs_b and len(pairs_b) >= 2
    assert a["kept"].to_list() == b["kept"].to_list()

    # the policy names the model that made the npz embeddings: the text tower of that checkpoint
    assert m["embeddings_model"]["model_id"] == manifest.read(str(fetched))["model"]["model_id"]
    summary = json.loads((npz_run / "selections" / "default" / "selection.json").read_text())
    assert summary["concepts"]["model_id"] == m["embeddings_model"]["model_id"]


def _one_shard(pool: Path, tmp: Path) -> Path:
    """A copy of the pool's first shard (parquet and npz) to spoil."""
    src = sorted(pool.glob("*.parquet"))[0]
    dst = tmp / src.name
    shutil.copy(src, dst)
    shutil.copy(npz_path(str(src)), npz_path(str(dst)))
    return dst


def _spoil(parquet: Path, **arrays) -> None:
    with np.load(npz_path(str(parquet))) as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    for k in [k for k, v in arrays.items() if v is None]:
        del data[k]
    np.savez(npz_path(str(parquet)), **data)


def test_a_misaligned_npz_is_refused_naming_the_file(pool, tmp_path):
    spec = _spec(pool, tmp_path / "unused")
    shard = _one_shard(pool, tmp_path)
    n = pl.read_parquet(shard).height
    rows = np.arange(n)
    assert shard_embeddings(str(shard), spec.input, rows).num_rows == n  # the copy as made: accepted

    with np.load(npz_path(str(shard))) as z:
        img, txt = z["l14_img"], z["l14_txt"]
    perm = np.random.default_rng(0).permutation(n)
    _spoil(shard, l14_img=img[perm], l14_txt=txt[perm])  # every row paired with another row's embeddings
    npz = re.escape(npz_path(str(shard)))
    with pytest.raises(EmbeddingsMismatch, match=f"{npz}: .* not row-aligned"):
        shard_embeddings(str(shard), spec.input, rows)
    _spoil(shard, l14_img=img[:-1], l14_txt=txt[:-1])  # a row short
    with pytest.raises(
        EmbeddingsMismatch, match=f"{npz}: {n - 1} rows of embeddings, but its metadata parquet has {n}"
    ):
        shard_embeddings(str(shard), spec.input, rows)
    _spoil(shard, l14_img=None, l14_txt=None)
    with pytest.raises(EmbeddingsMismatch, match=f"{npz}: no l14_img, l14_txt"):
        shard_embeddings(str(shard), spec.input, rows)
    Path(npz_path(str(shard))).unlink()
    with pytest.raises(EmbeddingsMismatch, match=f"{npz}: no precomputed embeddings file"):
        shard_embeddings(str(shard), spec.input, rows)


def test_a_run_over_a_misaligned_npz_fails_that_shard_by_name(pool, tmp_path):
    bad = tmp_path / "pool"
    shutil.copytree(pool, bad)
    shard = sorted(bad.glob("*.parquet"))[1]
    with np.load(npz_path(str(shard))) as z:
        data = {k: z[k][::-1] for k in z.files}  # rows reversed
    np.savez(npz_path(str(shard)), **data)
    res = run(_spec(bad, tmp_path / "run"), executor=LocalExecutor())
    assert not res.ok and list(res.failed) == [shard.stem], res.failed
    assert npz_path(str(shard)) in res.failed[shard.stem] and "not row-aligned" in res.failed[shard.stem]
    assert not (tmp_path / "run" / "embeddings" / f"{shard.stem}.parquet").exists()


def test_the_spec_takes_precomputed_embeddings_only_from_datacomp_metadata():
    base = {"name": "t", "input": {"paths": ["x"], "layout": "datacomp", "embeddings": {"key": "b32"}}}
    spec = parse_spec(base)
    assert (spec.input.embeddings.model_name, spec.input.embeddings.weights) == ("ViT-B-32", "openai")
    concept = {"concepts": {"c": {"prompts": ["a"], "min_similarity": 0.2}}, "dedup": {"image_cosine": 0.9}}
    assert parse_spec({**base, "selection": concept}).selection.concepts  # embeddings come with the input
    with pytest.raises(SpecError, match="needs input.layout = 'datacomp'"):
        parse_spec({"name": "t", "input": {"paths": ["x"], "layout": "laion", "embeddings": {"key": "l14"}}})
    with pytest.raises(SpecError, match="keep one"):
        parse_spec({**base, "score": {"store_embeddings": True}})
    with pytest.raises(SpecError, match="Input should be 'l14' or 'b32'"):
        parse_spec({"name": "t", "input": {"paths": ["x"], "layout": "datacomp", "embeddings": {"key": "h14"}}})
