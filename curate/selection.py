"""Write one selection of a run: decisions from cached annotations, then per input shard the kept
and removed rows, the sorted uid file and the report. Imports neither torch, open_clip nor ray:
re-selecting costs a read of the annotations and nothing else (a test holds us to that).

Layout: selections/<name>/
    kept/<shard>.parquet      the retained pairs (every annotation column)
    removed/<shard>.parquet   the removed pairs, with reason, reasons, duplicate_of
    uids.npy                  sorted kept uids as DataComp's (u8, u8) pairs
    selection.json            the rules applied, the resolved threshold, the counts
    report.json, report.html
"""

from __future__ import annotations

import io as _io
import time

import numpy as np
import polars as pl

from curate import annotations, forget, io, manifest, schema
from curate.config import ReportConfig, SelectionConfig
from curate.filters.select import decide
from curate.reports.audit import build_audit, write_audit

_DROP_FROM_OUTPUTS = (schema.URL_NORMALIZED,)


def selection_dir(run_dir: str, name: str) -> str:
    return io.join(run_dir, "selections", name)


def uids_to_datacomp(uids: list[str]) -> np.ndarray:
    """DataComp's uid file format: a sorted structured array of (high u64, low u64) pairs."""
    pairs = sorted({(int(u[:16], 16), int(u[16:32], 16)) for u in uids})
    return np.array(pairs, dtype=np.dtype("u8,u8"))


def write_selection(run_dir: str, sel: SelectionConfig, report_cfg: ReportConfig | None = None) -> dict:
    report_cfg = report_cfg or ReportConfig()
    t0 = time.time()
    m = manifest.read(run_dir)
    shards = annotations.completed_shards(run_dir)
    ann = annotations.scan(run_dir, shards)
    embeddings = annotations.embeddings_for(run_dir, sel, shards)
    missing = [c for c in report_cfg.group_columns if c not in ann.collect_schema().names()]
    if missing:  # checked before anything is written
        raise ValueError(f"report.group_columns {missing} are not annotation columns; add them to input.keep_columns")
    decisions_lf, resolved = decide(ann, sel, embeddings=embeddings)
    decisions = decisions_lf.collect()

    out = selection_dir(run_dir, sel.name)
    io.remove(out, recursive=True)  # a selection is rewritten whole, never appended to
    per_shard: dict[str, dict[str, int]] = {}
    for (shard,), part in decisions.partition_by(schema.SHARD, as_dict=True, maintain_order=True).items():
        part = part.drop(_DROP_FROM_OUTPUTS).sort(schema.ROW)
        kept = part.filter(pl.col(schema.KEPT)).drop(schema.REASON, schema.REASONS, schema.DUPLICATE_OF)
        removed = part.filter(pl.col(schema.KEPT).not_())
        io.write_parquet(io.join(out, "kept", f"{shard}.parquet"), kept.to_arrow())
        io.write_parquet(io.join(out, "removed", f"{shard}.parquet"), removed.to_arrow())
        per_shard[shard] = {"rows": part.height, "kept": kept.height, "removed": removed.height}

    kept_uids = decisions.filter(pl.col(schema.KEPT)).get_column(schema.UID).to_list()
    buf = _io.BytesIO()
    np.save(buf, uids_to_datacomp(kept_uids))
    io.atomic_write_bytes(io.join(out, "uids.npy"), buf.getvalue())

    counts = {
        "rows": decisions.height,
        "kept": int(decisions.get_column(schema.KEPT).sum()),
        "removed": int((~decisions.get_column(schema.KEPT)).sum()),
        "kept_unique_uids": len(set(kept_uids)),
        "not_scored": int((decisions.get_column(schema.REASON) == "not_scored").sum()),
    }
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
    report, tables = build_audit(
        decisions.lazy(), ann, sel, resolved.clip_threshold, report_cfg=report_cfg,
        extra_group_columns=report_cfg.group_columns, meta=meta, run_dir=run_dir, embeddings=embeddings,
    )
    # forgotten rows (curate forget) are counted: kept + removed + forgotten == rows read, per shard
    accounting = forget.reconcile_report(report, run_dir, shards, forget.excluded_counts(run_dir, shards))
    for shard, c in accounting.items():
        per_shard.setdefault(shard, {"rows": 0, "kept": 0, "removed": 0}).update(c)
    counts["forgotten"] = sum(c["forgotten"] for c in accounting.values())
    counts["rows_read"] = sum(c["rows_read"] for c in accounting.values())
    json_path, html_path = write_audit(report, tables, out)
    summary = {
        **meta,
        "counts": counts,
        "shards": per_shard,
        "reconciles": bool(report.get("reconciles")),
        "report_html": html_path,
        "report_json": json_path,
        "seconds": round(time.time() - t0, 3),
    }
    io.write_json(io.join(out, "selection.json"), summary)
    _record_in_manifest(run_dir, sel)
    return summary


def _record_in_manifest(run_dir: str, sel: SelectionConfig) -> None:
    """The selection's name and rules (what `curate forget` re-applies), and the checksums of the
    run's output files (only new or changed files are read)."""
    m = manifest.read(run_dir)
    if sel.name not in m.get("selections", []):
        m.setdefault("selections", []).append(sel.name)
    m.setdefault("selection_specs", {})[sel.name] = sel.model_dump(mode="json")
    manifest.record_outputs(run_dir, m)
    manifest.write(run_dir, m)
