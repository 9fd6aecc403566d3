"""Write one selection of a run: decisions from cached annotations, then per input shard the kept
and removed rows, the sorted uid file and the report. Imports neither torch, open_clip nor ray:
re-selecting costs a read of the annotations and nothing else (a test holds us to that).

Layout: selections/<name>/
    kept/, removed/ or decisions/, uids.npy   per input shard, as selection.write says
                              (curate/selection_files.py: the one writer of these files)
    selection.json            the rules applied, the resolved threshold, the counts (written last)
    report.json, report.html, tables/
On a bucket the files sit one level down, in the version CURRENT.json names (curate/publish.py);
readers find them with readable_dir().
"""

from __future__ import annotations

import io as _io
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl

from curate import (
    accounting,
    annotations,
    concepts,
    faults,
    io,
    manifest,
    publish,
    run_lock,
    schema,
    selection_files,
    store,
)
from curate.config import PipelineSpec, ReportConfig, SelectionConfig
from curate.distributed_decide import TASK, decide_blocks
from curate.distributed_selection import (
    concept_thresholds_on,
    finish_block,
    representatives_on,
    top_fraction_threshold,
    uid_slice,
)
from curate.default_executor import given_or_ray
from curate.filters.decide import DECIDED, decide, decide_inputs, nan_free_scores, on_ray, resolve_clip_threshold
from curate.filters.rules import clip_by
from curate.reports.summary import DEFAULT_GROUP_COLUMNS
from curate.names import check_name
from curate.selection_files import DECISION_COLUMNS  # noqa: F401 - what selection.write = "decisions" holds
from curate.reports.audit import build_audit, write_audit
from curate.reports.sources import BlockSource, FrameSource
from curate.reports.sweep import SCORE, check_sweepable, group_cut, representatives, spanning_duplicates, sweep
from curate.reports.tradeoff import OTHER, Units, tradeoff


def selection_dir(run_dir: str, name: str) -> str:
    return store.selection_dir(run_dir, name)


def uids_to_datacomp(uids: Sequence[str] | pl.Series) -> np.ndarray:
    """DataComp's uid file format: the distinct uids (32 hex digits each) as a sorted structured
    array of (high u64, low u64) pairs. Vectorised (polars parses, numpy sorts): ~0.6 s for 1 M
    uids where a Python set of int pairs took 4.5 s. A uid that is not 32 hex digits is an error
    naming it."""
    return selection_files.sorted_pairs(*selection_files.uid_halves(uids))


# what a selection folder holds, all written by write_selection; anything else there is not ours
owned = store.selection_owned  # whether a path inside a selection folder is a file written here


def readable_dir(run_dir: str, name: str) -> str:
    """Where selection `name` can be read now (its published version: curate/publish.py); the
    name is checked (store.selection_dir)."""
    return publish.resolve(selection_dir(run_dir, name))


def write_selection(run_dir: str, sel: SelectionConfig, report_cfg: ReportConfig | None = None) -> dict:
    """Decide, then publish selections/<name>/ whole (curate/publish.py): the new version is
    written beside the old one and swapped in, so a reader, or a kill at any point, sees the old
    selection complete or the new one complete. Holds the run's writer lock (curate/run_lock.py);
    the manifest records the selection only once it is in place."""
    check_name(sel.name, "selection name")  # before the lock and the decisions
    with run_lock.hold(run_dir):
        return _write_selection(run_dir, sel, report_cfg or ReportConfig())


def _write_selection(run_dir: str, sel: SelectionConfig, report_cfg: ReportConfig) -> dict:
    t0 = time.time()
    faults.fire("selection.start", sel.name)
    m = manifest.read(run_dir)
    shards = annotations.completed_shards(run_dir)
    ann = annotations.scan(run_dir, shards)
    embeddings = annotations.embeddings_for(run_dir, sel, shards)
    missing = [c for c in report_cfg.group_columns if c not in ann.collect_schema().names()]
    if missing:  # checked before anything is written
        raise ValueError(f"report.group_columns {missing} are not annotation columns; add them to input.keep_columns")
    ray = on_ray(sel, ann)
    t = time.perf_counter()
    ann, concept_set, concept_thresholds = _concepts(run_dir, m, sel, shards, ann, ray)
    concepts_s = time.perf_counter() - t  # the text tower on the prompts, the concepts' thresholds
    t = time.perf_counter()
    resolved = _resolved(run_dir, shards, sel, ann, concept_thresholds)
    rank_s = time.perf_counter() - t  # the CLIP threshold: a top fraction's ranking
    meta = {
        "selection": sel.name,
        "run_dir": run_dir,
        "rules": sel.model_dump(mode="json"),
        "resolved": resolved.as_dict(),
        "model": (m.get("model") or {}).get("model_id"),
        "language_model": m.get("language_model"),
        "run_state": m.get("state"),
        "failed_shards": m.get("failed_shards", {}),
        "unaccounted_rows": m.get("unaccounted_rows", {}),  # failed shards' rows (footer count or "unknown")
        "created_at": manifest.now(),
    }
    if concept_set is not None:  # the concept policy: prompts, the embeddings' model, the thresholds
        meta["concepts"] = concepts.describe(sel, concept_set, concept_thresholds)

    def audit(decisions: pl.LazyFrame, representatives_of=None):
        return build_audit(
            decisions,
            ann,
            sel,
            resolved.clip_threshold,
            report_cfg=report_cfg,
            extra_group_columns=report_cfg.group_columns,
            meta=meta,
            run_dir=run_dir,
            embeddings=embeddings,
            representatives_of=representatives_of,
        )

    if ray:
        write = _on_ray(run_dir, shards, sel, resolved, report_cfg, audit, concept_set)
    else:
        write = _in_process(run_dir, sel, ann, embeddings, resolved, report_cfg, audit, concept_set)

    def build(out: str, readable_at: str) -> dict:
        counts, per_shard, report, tables, timings, files = write(out)
        # forgotten rows (curate forget) are counted: kept + removed + forgotten == rows read, per shard
        per_shard_counts = accounting.reconcile_report(
            report, run_dir, shards, accounting.excluded_counts(run_dir, shards)
        )
        counts["forgotten"] = sum(c["forgotten"] for c in per_shard_counts.values())
        counts["rows_read"] = sum(c["rows_read"] for c in per_shard_counts.values())
        for shard, c in per_shard_counts.items():
            per_shard.setdefault(shard, {"rows": 0, "kept": 0, "removed": 0}).update(c)
        *_, table_digests = write_audit(report, tables, out)
        # the checksums the manifest records, hashed where each file was written (a task, at scale)
        known.update({io.join(readable_at, rel): d for rel, d in files.items()})
        known.update({io.join(readable_at, p[len(out) :].lstrip("/")): d for p, d in table_digests.items()})
        faults.fire("selection.report_written", sel.name)
        summary = {
            **meta,
            "counts": counts,
            "shards": per_shard,
            "reconciles": bool(report.get("reconciles")),
            "report_html": io.join(readable_at, "report.html"),
            "report_json": io.join(readable_at, "report.json"),
            "seconds": round(time.time() - t0, 3),
            "timings": {
                **({"concepts_s": round(concepts_s, 3)} if concept_set is not None else {}),
                "rank_s": round(rank_s, 3),
                **{k: round(v, 3) for k, v in timings.items()},
            },
        }
        io.write_json(io.join(out, "selection.json"), summary)  # last: a selection folder is complete
        faults.fire("selection.json_written", sel.name)
        return summary

    known: dict[str, dict[str, Any]] = {}  # final url -> {bytes, sha256}, filled by build
    summary = publish.publish(selection_dir(run_dir, sel.name), build, owned)
    faults.fire("selection.before_manifest", sel.name)
    _record_in_manifest(run_dir, sel, known, summary.get("concepts"))
    faults.fire("selection.after_manifest", sel.name)
    return summary


def _ranked_on_ray(run_dir: str, shards: list[str], sel: SelectionConfig, ann: pl.LazyFrame):
    """With the Ray engine, a top fraction's threshold ranked shard by shard on the cluster
    (curate/distributed_selection.py: no score column gathered here); None otherwise (decide()
    resolves the rule itself)."""
    if sel.clip.min_score is not None or sel.clip.top_fraction is None or not on_ray(sel, ann):
        return None
    return top_fraction_threshold(run_dir, shards, sel.clip.top_fraction, given_or_ray())


def _resolved(run_dir: str, shards: list[str], sel: SelectionConfig, ann: pl.LazyFrame, concept_thresholds):
    """The values the rules resolve from the pool: the CLIP threshold (a top fraction ranked by
    shard tasks on Ray, else here) and the concepts' thresholds (_concepts)."""
    resolved = _ranked_on_ray(run_dir, shards, sel, ann) or resolve_clip_threshold(ann, sel)
    return resolved if concept_thresholds is None else replace(resolved, concepts=concept_thresholds)


def _concepts(run_dir: str, m, sel: SelectionConfig, shards: list[str], ann: pl.LazyFrame, ray: bool):
    """(annotations, concept set, thresholds) for selection.concepts (curate/concepts.py): the
    prompts embedded here, once, by the text tower of the model that made the run's image
    embeddings (no image tower, no fetch), and each concept's threshold resolved (a top fraction
    ranked: over the annotations here, by shard tasks on Ray). For the local engine the
    annotations get each concept's score column; the Ray engine's blocks score their own shards.
    Without concepts: (ann, None, None), and nothing is loaded."""
    if not sel.concepts:
        return ann, None, None
    concepts.check_embeddings(run_dir, shards)
    concept_set = concepts.embed(sel, concepts.embeddings_model(m, run_dir))
    if ray:
        thresholds = concept_thresholds_on(given_or_ray(), run_dir, shards, sel, concept_set)
    else:
        ann = concepts.with_scores(ann, run_dir, shards, concept_set)
        thresholds = concepts.resolve_thresholds(ann, sel)
    return ann, concept_set.with_thresholds(thresholds), thresholds


def _in_process(run_dir: str, sel: SelectionConfig, ann, embeddings, resolved, report_cfg, audit, concept_set=None):
    """The local engine: decide() on the whole frame here, the report and the uid file checked
    before anything is written; returns the writer of the selection's files."""
    # the files get every annotation column back shard by shard (write below)
    t = time.perf_counter()
    decisions = decide(_decided_columns(ann, sel, report_cfg), sel, embeddings=embeddings, resolved=resolved)[0]
    keep = dict.fromkeys([*_report_columns(report_cfg), *DECIDED])  # what the report and the files read of it
    decisions = decisions.select([c for c in keep if c in decisions.collect_schema().names()]).collect()
    kept_uids = decisions.filter(pl.col(schema.KEPT)).get_column(schema.UID)
    # before anything is written: a uid that is not 32 hex digits, or a repeated kept uid (decide()
    # removes those: duplicate_uid), fails here, with the check the Ray engine's slices use
    uid_array = selection_files.sorted_pairs(*selection_files.uid_halves(kept_uids), unique=False)
    buf = _io.BytesIO()
    np.save(buf, uid_array)
    counts = {
        "rows": decisions.height,
        "kept": int(decisions.get_column(schema.KEPT).sum()),
        "removed": int((~decisions.get_column(schema.KEPT)).sum()),
        "kept_unique_uids": len(uid_array),
        "not_scored": int((decisions.get_column(schema.REASON) == "not_scored").sum()),
    }
    timings = {"decide_s": time.perf_counter() - t}
    t = time.perf_counter()
    report, tables = audit(decisions.lazy())
    timings["report_s"] = time.perf_counter() - t

    def write(out: str):
        t = time.perf_counter()
        per_shard: dict[str, dict[str, int]] = {}
        files: selection_files.Digests = {}
        for (shard,), part in decisions.partition_by(schema.SHARD, as_dict=True, maintain_order=True).items():
            rows = nan_free_scores(annotations.scan(run_dir, [shard]))
            rows = concepts.with_scores(rows, run_dir, [shard], concept_set).collect()  # the tags' scores too
            part = rows.join(part.select(schema.ROW, *DECIDED), on=schema.ROW, how="left", maintain_order="left")
            per_shard[shard], digests = selection_files.write_shard(out, shard, part, sel.write)
            files.update(digests)
            faults.fire("selection.shard_written", shard)
        files["uids.npy"] = io.atomic_write_bytes(io.join(out, "uids.npy"), buf.getvalue())
        faults.fire("selection.uids_written", sel.name)
        timings["write_s"] = time.perf_counter() - t
        return counts, per_shard, report, tables, timings, files

    return write


def _decided_columns(ann: pl.LazyFrame, sel: SelectionConfig, report_cfg: ReportConfig) -> pl.LazyFrame:
    """The annotation columns the rules, the survivor rule and the report read: what the local
    engine holds in memory (a fraction of the rows' bytes: no caption band keys unless caption
    near-dedup is on, no fetch errors, model names or input hashes)."""
    wanted = {*decide_inputs(sel), *_report_columns(report_cfg)}
    return ann.select([c for c in ann.collect_schema().names() if c in wanted])


def _report_columns(report_cfg: ReportConfig) -> list[str]:
    """What the report reads of the decided rows (the Ray engine gathers only these)."""
    return list(
        dict.fromkeys(
            [
                schema.SHARD,
                schema.ROW,
                schema.UID,
                schema.KEPT,
                schema.REASON,
                schema.REASONS,
                schema.CLIP_SCORE,
                schema.FETCH_STATUS,
                *DEFAULT_GROUP_COLUMNS,
                *report_cfg.group_columns,
            ]
        )
    )


def _decided_on_ray(
    run_dir: str, shards: list[str], sel: SelectionConfig, resolved, report_cfg, out: str | None, concept_set=None
):
    """The Ray engine (curate/distributed_decide.py, curate/distributed_selection.py): blocks of
    shards decided and (out given) written by tasks; returns (the executor, per-block summaries,
    the report's columns of every row left on the cluster as a BlockSource, the uid slices'
    futures)."""
    ex = given_or_ray()
    plan, states = decide_blocks(run_dir, shards, sel, resolved.clip_threshold, ex, concept_set=concept_set)
    ranges = plan.blocks
    cols = _report_columns(report_cfg)
    fin = [
        ex.submit(
            finish_block, plan, b, states[b], out, sel.write, cols, ranges, resources=TASK, num_returns=2 + ranges
        )
        for b in range(plan.blocks)
    ]
    slices = [ex.submit(uid_slice, *[f[2 + r] for f in fin], resources=TASK) for r in range(ranges)]
    summaries = ex.results([f[0] for f in fin])
    return ex, summaries, BlockSource(ex, [f[1] for f in fin]), slices


def _on_ray(run_dir: str, shards: list[str], sel: SelectionConfig, resolved, report_cfg, audit, concept_set=None):
    """The Ray engine's writer: decisions, files and uid slices by tasks; uids.npy streamed slice
    by slice; the report's questions asked of the blocks where they lie."""

    def write(out: str):
        t = time.perf_counter()
        ex, summaries, narrow, slices = _decided_on_ray(run_dir, shards, sel, resolved, report_cfg, out, concept_set)
        timings = {"decide_and_write_s": time.perf_counter() - t}
        per_shard: dict[str, dict[str, int]] = {}
        files: selection_files.Digests = {}
        for s in summaries:
            per_shard.update(s["shards"])
            files.update(s["files"])
        for shard in per_shard:
            faults.fire("selection.shard_written", shard)
        n_kept = sum(s["kept"] for s in summaries)
        t = time.perf_counter()
        # a task streams the slices into the file (selection_files.write_uids_fetched): not the driver
        uids = ex.submit(selection_files.write_uids_fetched, io.join(out, "uids.npy"), n_kept, slices, resources=TASK)
        files["uids.npy"] = ex.result(uids)
        faults.fire("selection.uids_written", sel.name)
        timings["uids_s"] = time.perf_counter() - t
        rows = sum(s["rows"] for s in summaries)
        counts = {
            "rows": rows,
            "kept": n_kept,
            "removed": rows - n_kept,
            "kept_unique_uids": n_kept,  # uid_slice refuses a repeated kept uid
            "not_scored": sum(s["not_scored"] for s in summaries),
        }
        t = time.perf_counter()
        report, tables = audit(
            narrow, lambda cols: representatives_on(ex, run_dir, shards, sel, cols, concept_set=concept_set)
        )
        timings["report_s"] = time.perf_counter() - t
        return counts, per_shard, report, tables, timings, files

    return write


def sweep_selection(
    run_dir: str,
    name: str,
    thr: Sequence[float],
    *,
    group_columns: Sequence[str] = (),
    top_groups: int = 6,
    include: dict[str, Sequence[str]] | None = None,
    equalize: str | None = None,
    targets: Sequence[float] = (),
    max_ratio: float | None = None,
) -> dict[str, Any]:
    """`curate sweep`: retention against the CLIP threshold with selection `name`'s other rules
    fixed (curate.reports.sweep), on the engine its rules name: with Ray the representatives are
    decided on the cluster and counted where they lie; the group sizes stream from the annotations.
    No thresholds: no sweep. equalize: the column of the retention-disparity trade-off at these
    target retentions (curate.reports.tradeoff), with its duplicate check (sweep.spanning_duplicates);
    so has a sweep of per-group thresholds. Nothing is written."""
    sel = SelectionConfig.model_validate(io.read_json(io.join(readable_dir(run_dir, name), "selection.json"))["rules"])
    shards = annotations.completed_shards(run_dir)
    ann = annotations.scan(run_dir, shards)
    embeddings = annotations.embeddings_for(run_dir, sel, shards)
    check_sweepable(ann, sel)
    m = manifest.read(run_dir)
    ann, concept_set, _ = _concepts(run_dir, m, sel, shards, ann, on_ray(sel, ann))
    cols = list(dict.fromkeys([SCORE, *group_columns, *clip_by(sel), *([equalize] if equalize else [])]))
    if on_ray(sel, ann):
        reps = representatives_on(given_or_ray(), run_dir, shards, sel, cols, concept_set=concept_set)
    else:  # decided once here, for the sweep and the trade-off
        reps = FrameSource(representatives(ann, sel, keep=cols, embeddings=embeddings).select(cols).collect())
    res: dict[str, Any] = {}
    if thr:
        res = sweep(ann, sel, thr, group_columns=group_columns, top_groups=top_groups, include=include, reps=reps)
        if sel.clip.by is not None:
            res["duplicates"] = spanning_duplicates(ann, sel, group_cut(sel.clip, sel.clip.min_score))
    if equalize:
        # a group gets its own threshold from the run's report.min_group_size candidates, as in the report
        min_group = PipelineSpec.model_validate(m["spec"]).report.min_group_size  # as _rebuild_report reads it
        res["tradeoff"] = tradeoff(
            reps,
            ann,
            equalize,
            targets,
            score_dtype=ann.collect_schema()[schema.CLIP_SCORE],
            max_ratio=max_ratio,
            min_candidates=min_group,
        )
        units = Units(equalize, tuple(u["value"] for u in res["tradeoff"]["units"] if u["value"] != OTHER), (), ())
        res["tradeoff"]["duplicates"] = spanning_duplicates(ann, sel, units.index())
    return res


def _record_in_manifest(
    run_dir: str, sel: SelectionConfig, known: dict[str, dict[str, Any]], concept_policy: dict | None = None
) -> None:
    """The selection's name and rules (what `curate forget` re-applies), and the checksums of the
    run's output files (`known`: the selection's files, hashed as they were written; other new or
    changed files are read)."""
    m = manifest.read(run_dir)
    if sel.name not in m.get("selections", []):
        m.setdefault("selections", []).append(sel.name)
    m.setdefault("selection_specs", {})[sel.name] = sel.model_dump(mode="json")
    manifest.record_concepts(m, sel.name, concept_policy)
    manifest.record_outputs(run_dir, m, known)
    manifest.write(run_dir, m)


def rebuild_report(
    run_dir: str,
    name: str = "default",
    *,
    sweep_thresholds: Sequence[float] | None = None,
    compare: tuple[float, float] | None = None,
    sweep_include: dict[str, Sequence[str]] | None = None,
    gallery_column: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Re-render selections/<name>/ report from the run's annotations: the selection's recorded
    rules are re-applied with decide() (no model, no network), then the audit is rebuilt."""
    out = readable_dir(run_dir, name)  # checks the name
    if not io.exists(io.join(out, "selection.json")):
        raise FileNotFoundError(f"{out}: no such selection (no selection.json); `curate select` makes one")
    with run_lock.hold(run_dir):  # report files are rewritten one by one, each atomically
        return _rebuild_report(
            run_dir,
            out,
            sweep_thresholds=sweep_thresholds,
            compare=compare,
            sweep_include=sweep_include,
            gallery_column=gallery_column,
            seed=seed,
        )


def _rebuild_report(
    run_dir: str, out: str, *, sweep_thresholds, compare, sweep_include, gallery_column, seed
) -> dict[str, Any]:
    summary = io.read_json(io.join(out, "selection.json"))
    sel = SelectionConfig.model_validate(summary["rules"])
    m = manifest.read(run_dir)
    cfg = PipelineSpec.model_validate(m["spec"]).report
    shards = annotations.completed_shards(run_dir)
    ann = annotations.scan(run_dir, shards)
    embeddings = annotations.embeddings_for(run_dir, sel, shards)
    representatives_of = None
    ann, concept_set, concept_thresholds = _concepts(run_dir, m, sel, shards, ann, on_ray(sel, ann))
    if on_ray(sel, ann):
        resolved = _resolved(run_dir, shards, sel, ann, concept_thresholds)
        ex, _, decisions, _ = _decided_on_ray(run_dir, shards, sel, resolved, cfg, None, concept_set)

        def representatives_of(cols):
            return representatives_on(ex, run_dir, shards, sel, cols, concept_set=concept_set)
    else:
        decisions, resolved = decide(_decided_columns(ann, sel, cfg), sel, embeddings=embeddings)
        decisions = decisions.collect().lazy()  # once: every report query reads it (as write_selection does)
    names = set(ann.collect_schema().names())
    extra = [c for c in cfg.group_columns if c in names]
    meta = {
        k: summary.get(k)
        for k in (
            "selection",
            "run_dir",
            "rules",
            "resolved",
            "model",
            "language_model",
            "run_state",
            "failed_shards",
            "unaccounted_rows",
            "created_at",
        )
    }
    meta["resolved"] = resolved.as_dict()
    if concept_set is not None:
        meta["concepts"] = concepts.describe(sel, concept_set, resolved.concepts or {})
    report, tables = build_audit(
        decisions,
        ann,
        sel,
        resolved.clip_threshold,
        report_cfg=cfg,
        extra_group_columns=extra,
        meta=meta,
        run_dir=run_dir,
        sweep_thresholds=sweep_thresholds,
        compare=compare,
        sweep_include=sweep_include,
        gallery_column=gallery_column,
        seed=seed,
        embeddings=embeddings,
        representatives_of=representatives_of,
    )
    # forgotten rows count: kept + removed + forgotten == rows read
    accounting.reconcile_report(report, run_dir, shards, accounting.excluded_counts(run_dir, shards))
    json_path, html_path, _ = write_audit(report, tables, out)
    return {"report": report, "report_json": json_path, "report_html": html_path}
