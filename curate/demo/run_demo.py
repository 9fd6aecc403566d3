"""`curate demo`: generate the synthetic dataset, serve its images from loopback servers, run the
demo spec end to end on local Ray with the bundled small CLIP, and compare with ground truth."""

from __future__ import annotations

import contextlib
from pathlib import Path

import polars as pl
import typer

from curate import io, schema
from curate.config import PipelineSpec, load_spec
from curate.demo.data import DEMO_ALLOWED_LANGUAGES, SITES, expected_outcome, generate
from curate.demo.image_server import ImageServer
from curate.presets import preset_path
from curate.runner import run
from curate.selection import readable_dir
from curate.stages.read import compute_uids


def demo_spec(out: Path) -> PipelineSpec:
    return load_spec(preset_path("demo")).with_overrides(
        **{"input.paths": [str(out / "input" / "shards")], "output.dir": str(out / "run"), "output.overwrite": True}
    )


DEMO_MARK = ".curate-demo"


def claim_demo_folder(out: Path) -> None:
    """The demo rewrites its own inputs (input/shards/*.parquet) and run: only in a new or empty
    folder, or one an earlier demo made (it leaves DEMO_MARK there). Any other folder is refused,
    so `curate demo --out ~/data` cannot delete a user's parquet files."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file, not a folder", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARK).exists():
        raise typer.BadParameter(
            f"{out} is not empty and was not made by `curate demo`; choose a new folder", param_hint="--out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("made by `curate demo`: it may rewrite input/ and run/ here\n")


def write_inputs(out: Path, rows: int, shards: int, seed: int, servers: dict[str, ImageServer]) -> pl.DataFrame:
    data = generate(rows, seed, {host: srv.port for host, srv in servers.items()})
    for s in data.served:
        servers[s.host].add(s.path, s.body, s.content_type)
    shard_dir = out / "input" / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("*.parquet"):
        old.unlink()
    df = data.rows.with_columns(
        (pl.col("index") * shards // data.rows.height).alias("_shard"),
    )
    gt = []
    for k, part in enumerate(df.partition_by("_shard", maintain_order=True)):
        name = f"part-{k:05d}"
        part.select("URL", "TEXT", "site").write_parquet(shard_dir / f"{name}.parquet")
        gt.append(
            part.with_columns(pl.lit(name).alias(schema.SHARD), pl.int_range(pl.len()).cast(pl.Int64).alias(schema.ROW))
        )
    truth = pl.concat(gt).drop("_shard")
    truth = truth.with_columns(
        pl.Series(schema.UID, compute_uids(truth["URL"].to_list(), truth["TEXT"].to_list())),
        expected_outcome(truth),
        pl.col("row_kind").is_in(["broken_404", "corrupt"]).alias("broken"),
    )
    originals = truth.select(pl.col("index").alias("duplicate_of_index"), pl.col(schema.UID).alias("duplicate_of_uid"))
    truth = truth.join(originals, on="duplicate_of_index", how="left", maintain_order="left")
    truth.write_parquet(out / "input" / "ground_truth.parquet")
    return truth


def evaluate(run_dir: str, truth: pl.DataFrame, selection: str = "default") -> dict:
    """Hold a selection against ground truth; the demo prints this and the tests assert on it."""
    sel = readable_dir(run_dir, selection)
    kept = (
        pl.read_parquet(io.join(sel, "kept", "*.parquet"))
        .select(schema.SHARD, schema.ROW)
        .with_columns(pl.lit(True).alias("kept"))
    )
    removed = (
        pl.read_parquet(io.join(sel, "removed", "*.parquet"))
        .select(schema.SHARD, schema.ROW, schema.REASON)
        .with_columns(pl.lit(False).alias("kept"))
    )
    decided = pl.concat([kept, removed], how="diagonal")
    j = truth.join(decided, on=[schema.SHARD, schema.ROW], how="left")

    def rate(mask: pl.Expr, what: pl.Expr) -> tuple[float, int]:
        sub = j.filter(mask)
        return (float(sub.select(what.mean()).item()) if sub.height else float("nan")), sub.height

    allowed = pl.col("expected") != "language"
    keep_rate, n_keep = rate(pl.col("expected") == "keep", pl.col("kept").fill_null(False))
    mism_rate, n_mism = rate(
        allowed & pl.col("row_kind").is_in(["unique", "near_duplicate"]) & pl.col("matched").not_(),
        (pl.col(schema.REASON) == "clip_score").fill_null(False),
    )
    # a duplicate group (original + copies) whose members all pass the other rules keeps one; a
    # group with a re-encoded copy is a near-duplicate group (found by dedup.image_cosine + pHash)
    groups = (
        j.filter(pl.col("expected") == "duplicate")
        .with_columns(pl.coalesce("duplicate_of_index", "index").alias("_group"))
        .group_by("_group")
        .agg(
            pl.col("kept").fill_null(False).sum().alias("kept"),
            (pl.col("matched").all() & (pl.col("gt_language").is_in(list(DEMO_ALLOWED_LANGUAGES))).all()).alias(
                "eligible"
            ),
            (pl.col("row_kind") == "near_duplicate").any().alias("near"),
        )
    )
    eligible_groups = groups.filter(pl.col("eligible"))
    near_groups = eligible_groups.filter(pl.col("near"))
    return {
        "rows": truth.height,
        "decided": int(j["kept"].is_not_null().sum()),
        "kept": int(j["kept"].fill_null(False).sum()),
        "matched_unique_fetchable_kept": keep_rate,
        "matched_unique_fetchable_n": n_keep,
        "mismatched_removed_by_clip": mism_rate,
        "mismatched_n": n_mism,
        "duplicate_groups": groups.height,
        "duplicate_groups_keeping_one": float((eligible_groups["kept"] == 1).mean())
        if eligible_groups.height
        else float("nan"),
        "duplicate_groups_keeping_more": int((groups["kept"] > 1).sum()),
        "near_duplicate_groups": near_groups.height,
        "near_duplicate_groups_keeping_one": float((near_groups["kept"] == 1).mean())
        if near_groups.height
        else float("nan"),
        # rows that should be kept but were removed as a near-duplicate of some other image
        "false_near_duplicates": int(
            j.filter((pl.col("expected") == "keep") & (pl.col(schema.REASON) == "duplicate_image_near")).height
        ),
    }


def run_demo(out: Path, rows: int = 600, shards: int = 3, seed: int = 0) -> int:
    out = out.resolve()
    claim_demo_folder(out)
    with contextlib.ExitStack() as stack:
        servers = {host: stack.enter_context(ImageServer(host)) for host, _ in SITES}
        typer.echo(
            f"demo: {rows} rows in {shards} shards; image servers on "
            + ", ".join(f"{h}:{s.port}" for h, s in servers.items())
        )
        truth = write_inputs(out, rows, shards, seed, servers)
        spec = demo_spec(out)
        result = run(spec)
    if result.failed:
        typer.secho(f"demo: {len(result.failed)} shard(s) failed: {result.failed}", fg=typer.colors.RED, err=True)
        return 1
    ev = evaluate(result.run_dir, truth)
    sel = result.selection or {}
    c = sel.get("counts", {})
    typer.echo("")
    typer.echo(
        f"rows in: {c.get('rows', 0):,}   kept: {c.get('kept', 0):,}   removed: {c.get('removed', 0):,}   "
        f"counts reconcile: {'yes' if sel.get('reconciles') else 'NO'}"
    )
    typer.echo(
        f"matched, unique, fetchable pairs kept:  {ev['matched_unique_fetchable_kept']:.1%} of {ev['matched_unique_fetchable_n']}"
    )
    typer.echo(
        f"mismatched pairs removed by CLIP rule:  {ev['mismatched_removed_by_clip']:.1%} of {ev['mismatched_n']}"
    )
    typer.echo(
        f"duplicate groups keeping one copy:      {ev['duplicate_groups_keeping_one']:.1%} of eligible groups "
        f"({ev['duplicate_groups_keeping_more']} groups kept more than one)"
    )
    typer.echo(
        f"  of which re-encoded (near) copies:    {ev['near_duplicate_groups_keeping_one']:.1%} of {ev['near_duplicate_groups']}; "
        f"distinct images removed as near-duplicates: {ev['false_near_duplicates']}"
    )
    typer.echo(f"ground truth: {out / 'input' / 'ground_truth.parquet'}")
    typer.echo(f"run directory: {result.run_dir}")
    typer.secho(f"report: {sel.get('report_html')}", bold=True)
    typer.echo(f"try: curate select {result.run_dir} --name strict --clip-min-score <higher>   (no model, seconds)")
    return 0 if sel.get("reconciles") else 1
