"""The `curate` command. Heavy imports (ray, torch, open_clip) happen inside the commands that
need them, so `curate select` and `curate --help` stay fast and model-free."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Filter and curate web-scale image-text datasets: fetch, CLIP-score, select, and audit.",
)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _print_selection(summary: dict) -> None:
    c = summary["counts"]
    rate = c["removed"] / c["rows"] if c["rows"] else 0.0
    typer.echo(
        f"selection {summary['selection']!r}: {c['rows']:,} rows -> kept {c['kept']:,}, removed {c['removed']:,} "
        f"({rate:.1%}); counts reconcile: {'yes' if summary['reconciles'] else 'NO'}"
    )
    typer.echo(f"report: {summary['report_html']}")


@app.command()
def run(
    spec_path: Path = typer.Argument(..., help="pipeline spec (TOML), e.g. pipelines/laion400m.toml"),
    input: Optional[list[str]] = typer.Option(None, "--input", "-i", help="input parquet file/dir/glob (repeatable); overrides input.paths"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="run directory (local or bucket URL); overrides output.dir"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address ('auto', 'ray://host:10001'); default: local Ray"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an existing run in the output directory"),
) -> None:
    """Run a pipeline spec: read, annotate, fetch, score on Ray, then write the default selection."""
    from curate.config import SpecError, load_spec
    from curate.runner import run as run_pipeline

    try:
        spec = load_spec(spec_path).with_overrides(
            **{"input.paths": list(input) if input else None, "output.dir": out, "ray.address": address,
               "output.overwrite": overwrite or None}
        )
    except SpecError as e:
        _fail(str(e))
    try:
        result = run_pipeline(spec)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(f"run directory: {result.run_dir}")
    if result.selection:
        _print_selection(result.selection)
    if result.failed:
        typer.secho(f"{len(result.failed)} shard(s) FAILED; their rows are not accounted for:", fg=typer.colors.RED, err=True)
        for shard, err in sorted(result.failed.items()):
            typer.secho(f"  {shard}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def select(
    run_dir: str = typer.Argument(..., help="a run directory written by `curate run`"),
    name: str = typer.Option(..., "--name", "-n", help="name of the new selection (selections/<name>/)"),
    clip_min_score: Optional[float] = typer.Option(None, "--clip-min-score", help="keep rows with clip_score >= this"),
    clip_top_fraction: Optional[float] = typer.Option(None, "--clip-top-fraction", help="keep the top fraction by clip_score (DataComp --fraction)"),
    no_clip: bool = typer.Option(False, "--no-clip", help="switch the CLIP rule off"),
    languages: Optional[str] = typer.Option(None, "--languages", help="comma-separated allow-list, e.g. en,de ('' = any)"),
    min_language_confidence: Optional[float] = typer.Option(None, "--min-language-confidence"),
    min_words: Optional[int] = typer.Option(None, "--min-words"),
    min_chars: Optional[int] = typer.Option(None, "--min-chars"),
    max_chars: Optional[int] = typer.Option(None, "--max-chars"),
    min_side: Optional[int] = typer.Option(None, "--min-side", help="minimum image side in pixels"),
    max_aspect: Optional[float] = typer.Option(None, "--max-aspect"),
    dedup_url: Optional[bool] = typer.Option(None, "--dedup-url/--no-dedup-url"),
    dedup_image: Optional[bool] = typer.Option(None, "--dedup-image/--no-dedup-image"),
) -> None:
    """Re-apply selection rules to a run's cached annotations: no model, no network, seconds.

    Rules not given on the command line are taken from the run's spec."""
    from curate import manifest
    from curate.config import PipelineSpec, SelectionConfig
    from curate.selection import write_selection

    try:
        m = manifest.read(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    spec = PipelineSpec.model_validate(m["spec"])
    data = spec.selection.model_dump(mode="json")
    data["name"] = name
    if no_clip:
        data["clip"] = {"min_score": None, "top_fraction": None}
    elif clip_min_score is not None or clip_top_fraction is not None:
        data["clip"] = {"min_score": clip_min_score, "top_fraction": clip_top_fraction}
    if languages is not None:
        data["language"]["allow"] = [x.strip() for x in languages.split(",") if x.strip()]
    for section, key, value in (
        ("language", "min_confidence", min_language_confidence), ("caption", "min_words", min_words),
        ("caption", "min_chars", min_chars), ("caption", "max_chars", max_chars), ("image", "min_side", min_side),
        ("image", "max_aspect", max_aspect), ("dedup", "url", dedup_url), ("dedup", "image_sha256", dedup_image),
    ):
        if value is not None:
            data[section][key] = value
    try:
        sel = SelectionConfig.model_validate(data)
        summary = write_selection(run_dir, sel, spec.report)
    except ValueError as e:
        _fail(str(e))
    _print_selection(summary)
    notscored = summary["counts"]["not_scored"]
    if notscored:
        typer.echo(f"{notscored:,} rows were never fetched or scored (an earlier, stricter run skipped them): "
                   "they are removed as 'not_scored'; rerun `curate run` with these rules to score them")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="where the demo writes its inputs and run"),
    rows: int = typer.Option(600, "--rows", min=30, help="number of URL-caption rows to generate"),
    shards: int = typer.Option(3, "--shards", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Offline end-to-end demo: synthetic shards, a local image server, the bundled small CLIP."""
    from curate.demo.run_demo import run_demo

    code = run_demo(out, rows=rows, shards=shards, seed=seed)
    raise typer.Exit(code)


@app.command("show-spec")
def show_spec(spec_path: Path = typer.Argument(..., help="pipeline spec (TOML)")) -> None:
    """Validate a spec and print it fully resolved (every default filled in)."""
    from curate.config import SpecError, load_spec

    try:
        typer.echo(load_spec(spec_path).resolved_json())
    except SpecError as e:
        _fail(str(e))


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
