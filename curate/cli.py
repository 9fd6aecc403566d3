"""The `curate` command. Heavy imports (ray, torch, open_clip) happen inside the commands that
need them, so `curate select` and `curate --help` stay fast and model-free."""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from curate.config import PipelineSpec, SelectionConfig, SpecError, describe, load_spec
from curate.executor import ClusterInfo, LocalExecutor
from curate.filters import rules
from curate.layout import resolve as resolve_layout
from curate.presets import preset_path

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Filter and curate web-scale image-text datasets: fetch, CLIP-score, select, and audit.",
)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# errors a command reports as one `error:` line: bad input, a busy or foreign run directory, a
# file that is missing, a folder, unreadable or not writable (OSError names the path)
_USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)
_INTERRUPTED = "interrupted (Ctrl-C); nothing half-written is visible: run the same command again to finish"


def _print_selection(summary: dict) -> None:
    c = summary["counts"]
    rate = c["removed"] / c["rows"] if c["rows"] else 0.0
    failed = summary.get("failed_shards") or {}
    scope = (
        f" over the {len(summary.get('shards', {})):,} completed shard(s), {len(failed)} FAILED (listed above)"
        if failed
        else ""
    )
    typer.echo(
        f"selection {summary['selection']!r}: {c['rows']:,} rows -> kept {c['kept']:,}, removed {c['removed']:,} "
        f"({rate:.1%}); counts reconcile{scope}: {'yes' if summary['reconciles'] else 'NO'}"
    )
    typer.echo(f"report: {summary['report_html']}")


@app.command()
def run(
    spec_path: str = typer.Argument(
        ..., help="pipeline spec: a TOML file, or a preset name (laion400m, laion2b_en, datacomp_basic, ...)"
    ),
    input: Optional[list[str]] = typer.Option(
        None, "--input", "-i", help="input parquet file/dir/glob (repeatable); overrides input.paths"
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="run directory (local or bucket URL); overrides output.dir"
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster address ('auto', 'ray://host:10001'); default: local Ray"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an existing run in the output directory"),
    executor: str = typer.Option(
        "ray",
        "--executor",
        help="ray: a local Ray, or the cluster of --address; local: every stage in this process, one shard "
        "after another, without Ray (small inputs, debugging)",
    ),
) -> None:
    """Run a pipeline spec: read, annotate, fetch, score on Ray, then write the default selection."""
    if executor not in ("ray", "local"):
        _fail(f"--executor {executor!r}: use 'ray' or 'local'")
    if executor == "local" and address:
        _fail("--executor local runs in this process: it cannot use --address (a Ray cluster)")
    # lazy: curate.runner adds ~0.33 s (pyarrow, fsspec, the run stack); --help and other commands skip it
    from curate.runner import run as run_pipeline

    try:
        spec = load_spec(preset_path(spec_path)).with_overrides(
            **{
                "input.paths": list(input) if input else None,
                "output.dir": out,
                "ray.address": address,
                "output.overwrite": overwrite or None,
            }
        )
    except (SpecError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        result = run_pipeline(spec, executor=LocalExecutor() if executor == "local" else None)
    except KeyboardInterrupt:
        _fail(f"{_INTERRUPTED} (the manifest says 'interrupted')", 130)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(f"run directory: {result.run_dir}")
    if result.failed:  # first: no summary line may read as "all is well" above it
        typer.secho(
            f"{len(result.failed)} shard(s) FAILED; their rows are not accounted for:", fg=typer.colors.RED, err=True
        )
        for shard, err in sorted(result.failed.items()):
            typer.secho(f"  {shard}: {err}", fg=typer.colors.RED, err=True)
    if result.selection:
        _print_selection(result.selection)
    if result.failed:
        raise typer.Exit(1)


def select(run_dir: str, name: str, **flags: object) -> None:
    """Re-apply selection rules to a run's cached annotations: no model, no network, seconds.

    Rules not given on the command line are taken from the run's spec."""
    # lazy: curate.manifest adds ~0.32 s (pyarrow, fsspec via curate.io); --help and other commands skip it
    from curate import manifest

    # lazy: curate.selection adds ~0.35 s (pyarrow, fsspec, reports); --help and other commands skip it
    from curate.selection import write_selection

    try:
        m = manifest.read(run_dir)  # a clear error when missing, corrupt or not curate's
        spec = PipelineSpec.model_validate(m.spec)
    except ValidationError as e:
        _fail(f"{run_dir}/manifest.json: its spec is not valid with this version of curate\n" + describe(e))
    except _USER_ERRORS as e:
        _fail(str(e))
    data = spec.selection.model_dump(mode="json")
    data["name"] = name
    for key in ("engine", "write"):  # where the selection runs and what it writes, when given
        value = flags.pop(key)
        if value is not None:
            data[key] = value
    try:
        rules.apply_flags(data, flags)  # the rule registry's flags (filters/rules.py)
    except ValueError as e:  # a flag's own syntax (--clip-thresholds COLUMN:VALUE=T,...)
        _fail(str(e))
    try:
        sel = SelectionConfig.model_validate(data)
    except ValidationError as e:
        _fail("invalid selection options\n" + describe(e, "selection"))
    try:
        summary = write_selection(run_dir, sel, spec.report)
    except KeyboardInterrupt:
        _fail(f"{_INTERRUPTED}; the previous selection {name!r}, if any, is intact", 130)
    except _USER_ERRORS as e:
        _fail(str(e))
    _print_selection(summary)
    notscored = summary["counts"]["not_scored"]
    if notscored:
        typer.echo(
            f"{notscored:,} rows were never fetched or scored (an earlier, stricter run skipped them): "
            "they are removed as 'not_scored'; rerun `curate run` with these rules to score them"
        )


def _select_signature() -> inspect.Signature:
    """`curate select RUN --name N` plus one option per flag the rule registry declares: a new
    rule's flags appear here without touching this file."""
    P = inspect.Parameter
    params = [
        P(
            "run_dir",
            P.POSITIONAL_OR_KEYWORD,
            annotation=str,
            default=typer.Argument(..., help="a run directory written by `curate run`"),
        ),
        P(
            "name",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(..., "--name", "-n", help="name of the new selection (selections/<name>/)"),
        ),
        P(
            "engine",
            P.KEYWORD_ONLY,
            annotation=Optional[str],
            default=typer.Option(None, "--engine", help="local, ray or auto (selection.engine; default: the spec's)"),
        ),
        P(
            "write",
            P.KEYWORD_ONLY,
            annotation=Optional[str],
            default=typer.Option(
                None, "--write", help="full, kept or decisions: what the selection writes (selection.write)"
            ),
        ),
    ]
    for flag in rules.FLAGS:
        annotation = bool if flag.is_switch else Optional[flag.type]
        default = typer.Option(False if flag.is_switch else None, *flag.decl.split(" "), help=flag.help or None)
        params.append(P(flag.param, P.KEYWORD_ONLY, annotation=annotation, default=default))
    return inspect.Signature(params, return_annotation=None)


select.__signature__ = _select_signature()  # typer reads the options from the signature
app.command()(select)


@app.command()
def forget(
    run_dir: str = typer.Argument(..., help="a run directory written by `curate run`"),
    urls: Optional[str] = typer.Option(
        None, "--urls", help="file of URLs, one a line (matched as given and normalised)"
    ),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="file of image sha256 hex digests, one a line"),
    uids: Optional[str] = typer.Option(None, "--uids", help="file of uids, one a line"),
) -> None:
    """Delete rows on request: from annotations, images, embeddings, work files and every selection
    (rewritten from the cleaned annotations), and from every later run and selection."""
    # lazy: curate.forget adds ~0.31 s (pyarrow, fsspec via curate.io); --help and other commands skip it
    from curate.forget import forget_rows

    given = [(k, v) for k, v in (("urls", urls), ("sha256", sha256), ("uids", uids)) if v]
    if len(given) != 1:
        _fail("give exactly one of --urls, --sha256, --uids")
    kind, path = given[0]
    try:
        rec = forget_rows(run_dir, kind, path)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(
        f"forgot {rec['rows_removed']:,} row(s) in {len(rec['rows_removed_by_shard'])} shard(s) "
        f"({rec['entries']:,} {kind} listed); selections rewritten: {', '.join(rec['selections_rewritten']) or 'none'}; "
        f"counts reconcile: {'yes' if rec['reconciles'] else 'NO'}"
    )
    if not rec["reconciles"]:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="where the demo writes its inputs and run"),
    rows: int = typer.Option(600, "--rows", min=30, help="number of URL-caption rows to generate"),
    shards: int = typer.Option(3, "--shards", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Offline end-to-end demo: synthetic shards, a local image server, the bundled small CLIP."""
    # lazy: curate.demo.run_demo adds ~0.26 s (pyarrow, fsspec, the runner); --help and other commands skip it
    from curate.demo.run_demo import run_demo

    code = run_demo(out, rows=rows, shards=shards, seed=seed)
    raise typer.Exit(code)


@app.command("show-spec")
def show_spec(spec_path: str = typer.Argument(..., help="pipeline spec: a TOML file or a preset name")) -> None:
    """Validate a spec and print it fully resolved (every default filled in), then (on stderr) the
    scoring layout it gets on this machine; a cluster's is resolved at run time and recorded in the
    run's manifest (m["layout"])."""
    try:
        spec = load_spec(preset_path(spec_path))
    except (SpecError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(spec.resolved_json())
    if spec.score.source == "model" and spec.fetch.enabled:
        here = ClusterInfo("this machine", float(os.cpu_count() or 1), 0.0, 1)
        typer.echo(
            f"layout on this machine ({here.cpus:g} CPUs, GPUs not probed): {resolve_layout(spec.score, here).describe()}",
            err=True,
        )


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="a run directory written by `curate run`"),
    selection: str = typer.Option("default", "--selection", "-s", help="selection name (selections/<name>/)"),
    sweep_from: Optional[float] = typer.Option(
        None, "--from", help="sweep start (default: the scores' 2nd percentile)"
    ),
    sweep_to: Optional[float] = typer.Option(None, "--to", help="sweep end (default: the scores' 98th percentile)"),
    step: Optional[float] = typer.Option(None, "--step"),
    compare: Optional[str] = typer.Option(None, "--compare", help="'A,B': list what flips between thresholds A and B"),
    gallery_group: Optional[str] = typer.Option(
        None, "--gallery-group", help="grouping column for the boundary gallery"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the boundary-gallery sample"),
) -> None:
    """Re-render a selection's audit report (HTML, JSON, tables/*.parquet) from the run's annotations."""
    # lazy: curate.selection adds ~0.35 s (pyarrow, fsspec, reports); --help and other commands skip it
    from curate.selection import rebuild_report

    # lazy: curate.reports.sweep adds ~0.21 s (pyarrow via filters.decide); --help and other commands skip it
    from curate.reports.sweep import thresholds

    thr = None
    if sweep_from is not None or sweep_to is not None or step is not None:
        if sweep_from is None or sweep_to is None or step is None:
            _fail("give --from, --to and --step together")
        thr = thresholds(sweep_from, sweep_to, step)
    cmp_ = None
    if compare:
        try:
            a, b = (float(x) for x in compare.split(","))
        except ValueError:
            _fail("--compare takes 'A,B', e.g. 0.25,0.30")
        cmp_ = (a, b)
    try:
        res = rebuild_report(
            run_dir, selection, sweep_thresholds=thr, compare=cmp_, gallery_column=gallery_group, seed=seed
        )
    except _USER_ERRORS as e:
        _fail(str(e))
    rep = res["report"]
    t = rep["totals"]
    flagged = sum(sec.get("flagged_groups", 0) for sec in rep["groups"].values())
    # the page's lead view: a grouping a rule targets by design is judged net of it (reports/policy_net.py)
    nets = [((sec.get("policy") or {}).get("net") or sec) for sec in rep["groups"].values()]
    net = sum(sec.get("flagged_groups", 0) for sec in nets)
    flags = (
        f"{net} group(s) flagged net of policy ({flagged} over all rows)"
        if net != flagged
        else f"{flagged} group(s) flagged"
    )
    typer.echo(
        f"{t['rows_in']:,} rows, kept {t['kept']:,}, removal rate {t['removal_rate'] or 0:.1%}; "
        f"{flags}; counts reconcile: {'yes' if rep['reconciles'] else 'NO'}"
    )
    typer.echo(f"report: {res['report_html']}")


@app.command()
def sweep(
    run_dir: str = typer.Argument(..., help="a run directory written by `curate run`"),
    rule: str = typer.Option("clip", "--rule", help="the rule to sweep (only 'clip')"),
    sweep_from: Optional[float] = typer.Option(None, "--from", help="first threshold (with --to)"),
    sweep_to: Optional[float] = typer.Option(None, "--to", help="last threshold (with --from)"),
    step: float = typer.Option(0.01, "--step"),
    group: Optional[list[str]] = typer.Option(
        None, "--group", "-g", help="grouping column (repeatable), e.g. language"
    ),
    include: Optional[list[str]] = typer.Option(
        None, "--include", help="also sweep this group, COLUMN=VALUE (repeatable)"
    ),
    top: int = typer.Option(6, "--top", help="largest groups per grouping"),
    selection: str = typer.Option("default", "--selection", "-s", help="whose other rules stay fixed"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="write the long table here (.parquet or .csv)"),
    equalize: Optional[str] = typer.Option(
        None,
        "--equalize",
        help="trade-off by this column (e.g. language): one threshold vs per-group thresholds that equalise the "
        "groups' removal rates (docs/POLICY.md); needs --target-retention",
    ),
    target: Optional[list[float]] = typer.Option(
        None, "--target-retention", help="share of the pool's rows to keep, e.g. 0.3 (repeatable)"
    ),
    max_ratio: Optional[float] = typer.Option(
        None, "--max-ratio", help="also: thresholds keeping every group's removal rate within this ratio of the overall"
    ),
) -> None:
    """Retention vs CLIP threshold from cached scores (other rules fixed, exact; no model), and the
    retention-disparity trade-off (--equalize). Changes no selection."""
    # lazy: curate.reports.sweep adds ~0.21 s (pyarrow via filters.decide); --help and other commands skip it
    from curate.reports.sweep import thresholds

    if rule != "clip":
        _fail("only --rule clip can be swept")
    if (sweep_from is None) != (sweep_to is None):
        _fail("give --from and --to together")
    if (target or max_ratio is not None) and not equalize:
        _fail("--target-retention and --max-ratio belong to --equalize COLUMN")
    if sweep_from is None and not equalize:
        _fail("give --from and --to (a sweep), or --equalize COLUMN --target-retention R (the trade-off), or both")
    if equalize and not target:
        _fail("--equalize needs --target-retention (a share of the rows, e.g. 0.3)")
    try:
        thr = thresholds(sweep_from, sweep_to, step) if sweep_from is not None else []
        # lazy: curate.selection adds ~0.35 s (pyarrow, fsspec, reports); --help and other commands skip it
        from curate.selection import sweep_selection

        inc: dict[str, list[str]] = {}
        for item in include or []:
            k, _, v = item.partition("=")
            inc.setdefault(k, []).append(v)
        groups = list(dict.fromkeys([*(group or []), *inc]))
        res = sweep_selection(
            run_dir,
            selection,
            thr,
            group_columns=groups,
            top_groups=top,
            include=inc,
            equalize=equalize,
            targets=target or (),
            max_ratio=max_ratio,
        )
    except _USER_ERRORS as e:
        _fail(str(e))
    if thr:
        _print_sweep(res, out)
    if equalize:
        # lazy: curate.reports.tradeoff adds polars and numpy; --help and other commands skip it
        from curate.reports.tradeoff import tradeoff_lines

        for line in tradeoff_lines(res["tradeoff"]):
            typer.echo(line)


def _print_sweep(res: dict, out: str | None) -> None:
    table = res["tables"]["sweep"]
    if out:
        table.write_csv(out) if out.endswith(".csv") else table.write_parquet(out)
    per_group = res.get("per_group")
    if per_group:
        gaps = ", ".join(f"{g} {v[0] - res['thresholds'][0]:+g}" for g, v in per_group["thresholds"].items())
        typer.echo(
            f"per-group thresholds by {per_group['by']}: the threshold column is the default (min_score); "
            f"each named group's threshold moves with it ({gaps})"
        )
        dup = res.get("duplicates") or {}
        spans = sum((dup.get("key_groups") or {}).values())
        if spans:  # (a near dedup's clusters are not checked: the note below covers them)
            typer.echo(f"  not exact: {spans} duplicate group(s) hold copies with different thresholds")
    if res.get("near_dedup"):
        typer.echo(f"note: {res['near_dedup']}")
    labels = ["all"] + [f"{c}={g['value']}" for c, gs in res["groups"].items() for g in gs]
    series = [res["overall"]["retention"]] + [g["retention"] for gs in res["groups"].values() for g in gs]
    typer.echo("threshold  " + "  ".join(f"{x[:12]:>12}" for x in labels))
    for i, t in enumerate(res["thresholds"]):
        typer.echo(f"{t:9.4f}  " + "  ".join(f"{(s[i] if s[i] is not None else float('nan')):12.1%}" for s in series))


@app.command()
def diff(
    a: str = typer.Argument(..., help="selection dir (selections/<name>) or run dir"),
    b: str = typer.Argument(..., help="selection dir or run dir"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="write diff.json and diff.html into this directory"),
) -> None:
    """Compare two selections or runs: kept-uid overlap, per-group retention change, config differences."""
    # lazy: curate.io adds ~0.23 s (pyarrow, fsspec); --help and other commands skip it
    from curate import io

    # lazy: curate.reports.diff adds ~0.33 s (pyarrow, fsspec via curate.io); --help and other commands skip it
    from curate.reports.diff import diff as run_diff, render_diff_html

    try:
        d = run_diff(a, b)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(
        f"kept A {d['kept_a']:,}, kept B {d['kept_b']:,}, both {d['kept_both']:,}; Jaccard "
        + ("n/a" if d["jaccard"] is None else f"{d['jaccard']:.4f}")
    )
    for k, v in d["config"].items():
        typer.echo(f"  {k}: {json.dumps(v['a'], default=str)} -> {json.dumps(v['b'], default=str)}")
    ct = d.get("clip_thresholds")
    for r in (ct or {}).get("groups", []):
        if r["changed"]:
            typer.echo(f"  CLIP threshold for {r['value']}: {r['a']} -> {r['b']}")
    for c, rows in d["groups"].items():
        for r in rows[:5]:
            if r["change"]:
                typer.echo(f"  {c}={r['value']}: retention {r['retention_a'] or 0:.1%} -> {r['retention_b'] or 0:.1%}")
    if out:
        io.write_json(io.join(out, "diff.json"), d)
        io.atomic_write_text(io.join(out, "diff.html"), render_diff_html(d))
        typer.echo(f"diff: {io.join(out, 'diff.html')}")


@app.command("export")
def export_command(
    run_dir: str = typer.Argument(..., help="a run directory written by `curate run` (local or bucket URL)"),
    to: str = typer.Option(..., "--to", help="output folder or bucket prefix (new, or an earlier export's)"),
    selection: Optional[str] = typer.Option(
        None, "--selection", "-s", help="selection to export (selections/<name>/; default: 'default')"
    ),
    fmt: str = typer.Option(
        "webdataset", "--format", help="webdataset: tars of the cached images; parquet: url + caption pairs"
    ),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="rows per output shard"),
    uids: Optional[str] = typer.Option(
        None, "--uids", help="instead of a selection: the run's rows whose uid is in this DataComp uids.npy"
    ),
) -> None:
    """Write a selection as training shards (docs/EXPORT.md): webdataset tars of the cached images,
    or parquet pairs for an img2dataset re-download; one Ray task per shard, resumable."""
    # lazy: curate.export adds ~0.35 s (pyarrow, fsspec via curate.io); --help and other commands skip it
    from curate.export import export

    if uids is not None and selection is not None:
        _fail("give --selection or --uids, not both")
    try:
        s = export(
            run_dir, to, fmt, selection=None if uids else (selection or "default"), uids=uids, shard_size=shard_size
        )
    except KeyboardInterrupt:
        _fail(f"{_INTERRUPTED}: finished shards are kept", 130)
    except _USER_ERRORS as e:
        _fail(str(e))
    c = s["counts"]
    typer.echo(
        f"exported {c['exported']:,} of {c['rows']:,} rows into {s['shards']:,} {fmt} shard(s) at {to} "
        f"({s['skipped_shards']:,} already complete); counts reconcile: {'yes' if s['reconciles'] else 'NO'}"
    )
    if c["missing"]:
        typer.echo(f"{c['missing']:,} row(s) have no image in the run's cache: listed in {to}/_missing.parquet")
    if uids is not None:
        typer.echo(f"{c['uids_not_found']:,} of {c['uids_distinct']:,} listed uid(s) are not in the run")
    if not s["reconciles"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
