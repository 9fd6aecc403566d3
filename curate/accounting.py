"""Run accounting with deletions: kept + removed + forgotten == rows read, per shard and in
total, from the completion markers (rows_read, forgotten) and the selection's own counts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from curate import annotations, io, schema
from curate.deletions import exclude_expr, load_keys, rows_read


def marker_counts(run_dir: str, shard: str) -> dict[str, int]:
    """rows_read and forgotten of a finished shard, to carry into a rewritten marker."""
    mk = io.read_json(annotations.marker_path(run_dir, shard))
    return {"rows_read": rows_read(mk), "forgotten": int(mk.get("forgotten", 0))}


def reconcile_report(
    report: dict[str, Any], run_dir: str, shards: list[str], excluded: dict[str, int] | None = None
) -> dict[str, Any]:
    """Add forgotten rows to a selection report and check kept + removed + forgotten == rows_read
    per shard and in total (rows_read and forgotten from the completion markers; `excluded`: rows
    the selection-time filter left out, which count as forgotten too). Adds totals.forgotten,
    totals.rows_read and per shard the same; a mismatch is a problem and the report does not
    reconcile. Returns {shard: {rows_read, forgotten}}."""
    excluded = excluded or {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = dict(zip(shards, pool.map(lambda s: io.read_json(annotations.marker_path(run_dir, s)), shards)))
    rows_in = {str(x["shard"]): int(x["rows_in"]) for x in report.get("shards", [])}
    per: dict[str, dict[str, int]] = {}
    for s, mk in markers.items():
        forgotten = int(mk.get("forgotten", 0)) + int(excluded.get(s, 0))
        # a marker without counts (hand-made) states nothing to check against: trust the rows
        read = rows_read(mk) if "rows" in mk or "rows_read" in mk else rows_in.get(s, 0) + forgotten
        per[s] = {"rows_read": read, "forgotten": forgotten}
    problems = []
    for s, c in per.items():
        if rows_in.get(s, 0) + c["forgotten"] != c["rows_read"]:
            problems.append(
                f"shard {s}: {rows_in.get(s, 0):,} rows decided + {c['forgotten']:,} forgotten != {c['rows_read']:,} rows read"
            )
    for x in report.get("shards", []):
        c = per.get(str(x["shard"]), {"rows_read": int(x["rows_in"]), "forgotten": 0})
        x["forgotten"], x["rows_read"] = c["forgotten"], c["rows_read"]
    t = report.setdefault("totals", {})
    t["forgotten"] = sum(c["forgotten"] for c in per.values())
    t["rows_read"] = sum(c["rows_read"] for c in per.values())
    if problems:
        report.setdefault("problems", []).extend(problems)
        report["reconciles"] = False
    return per


def excluded_counts(run_dir: str, shards: list[str]) -> dict[str, int]:
    """Rows still in finished annotation files that a uid/sha256 key matches, per shard (zero
    after `curate forget`; non-zero only if a shard was written while a forget ran)."""
    keys = load_keys(run_dir)
    if not keys or not shards:
        return {}
    lf = annotations.scan(run_dir, shards, include_forgotten=True)
    expr = exclude_expr(keys, lf.collect_schema().names())
    df = lf.filter(expr).group_by(schema.SHARD).len().collect()
    return {s: int(n) for s, n in df.iter_rows()}
