"""`curate forget`: honour a deletion request. Store the keys (curate/deletions.py), remove the
matching rows from every file of the run directory, rewrite every selection from the cleaned
annotations, and record the request. It sits above selection, like the other commands.

Where the keys apply:
    curate forget   annotations/, images/, embeddings/ of every shard (what a killed run left in
                    _work/ is discarded), then every selection is rewritten from the cleaned
                    annotations (write_selection: no model, no network).
    curate run      prepare_shard drops matching rows right after reading an input shard and
                    cleans a finished shard before reusing it; finish_windows drops them after
                    fetching (image sha256).
    selection       annotations.scan leaves out rows matching a uid or sha256 key (defence in depth:
                    after `curate forget` the annotations hold none).

It holds the run directory's writer lock (curate/run_lock.py): no run or select writes meanwhile.

Accounting: a shard's completion marker has rows_read (rows in the input shard), rows (rows in its
annotation file) and forgotten; rows + forgotten == rows_read, and a selection's
kept + removed + forgotten == rows_read per shard and in total (curate/accounting.py).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import accounting, annotations, io, manifest, publish, run_lock, schema, selection, store
from curate.config import PipelineSpec, SelectionConfig
from curate.deletions import (
    Keys,
    _keys_frame,
    add_keys,
    describe_lists,
    keys_for,
    load_keys,
    log_path,
    match,
    parse_list,
    read_log,
)
from curate.names import is_name


def _side_paths(run_dir: str, shard: str) -> dict[str, str]:
    return {
        "images": store.images_path(run_dir, shard),
        "embeddings": store.embeddings_path(run_dir, shard),
    }


def _drop_rows(path: str, rows: set[int]) -> int:
    if not rows or not io.exists(path):
        return 0
    t = io.read_parquet(path)
    hit = pc.is_in(t.column(schema.ROW), value_set=pa.array(sorted(rows), pa.int64()))
    k = int(pc.sum(hit).as_py() or 0)
    if k:
        io.write_parquet(path, t.filter(pc.invert(hit)))
    return k


def clean_shard(run_dir: str, shard: str, keys: Keys) -> dict[str, Any]:
    """Remove matching rows from one shard's files: images/ and embeddings/ first, then the
    annotation file, then its marker (rows, forgotten, scored, fetch_status rewritten; rows_read
    kept). What a run left of the shard in flight (_work/<shard>/, which may hold images of the
    rows) is discarded whole: the next run redoes it. Idempotent, and safe to repeat after a crash
    at any point: the keys are already stored, and a marker that disagrees with its annotation file
    is rewritten. Returns {"rows": removed annotation rows, "uids": their uids, per-file counts
    ("work": the in-flight rows that matched)}."""
    side = _side_paths(run_dir, shard)
    ann_path = annotations.shard_path(run_dir, shard)
    ann = pl.from_arrow(io.read_parquet(ann_path)) if io.exists(ann_path) else None
    rows, uids = _matched(ann, keys)
    work = store.work_path(run_dir, shard)
    work_rows, work_uids = _matched(pl.from_arrow(io.read_parquet(work)) if io.exists(work) else None, keys)
    rows, uids, in_flight = rows | work_rows, uids | work_uids, len(work_rows)
    out: dict[str, Any] = {"shard": shard, "rows": 0, "uids": sorted(uids), "work": in_flight}
    for name, p in side.items():
        out[name] = _drop_rows(p, rows)
    store.discard_in_flight(run_dir, shard)
    removed = 0
    if ann is not None:
        removed = _drop_rows(ann_path, rows)
        out["rows"] = removed
    if io.exists(store.marker_path(run_dir, shard)):
        mk = store.read_marker(run_dir, shard)
        height = ann.height - removed if ann is not None else mk.rows
        if removed or mk.rows != height:
            final = pl.from_arrow(io.read_parquet(ann_path, columns=[schema.FETCH_STATUS, schema.CLIP_SCORE]))
            store.write_marker(run_dir, accounting.recount(mk, final))
    return out


def _matched(frame: pl.DataFrame | None, keys: Keys) -> tuple[set[int], set[str]]:
    """(rows, non-empty uids) of the rows of `frame` a key matches; empty sets for no frame."""
    if frame is None:
        return set(), set()
    hit = frame.filter(match(frame, keys))
    return set(hit.get_column(schema.ROW).to_list()), {u for u in hit.get_column(schema.UID).to_list() if u}


def _shards_with_files(run_dir: str) -> list[str]:
    found: set[str] = set(store.in_flight_shards(run_dir))
    for d in store.SHARD_DIRS:
        top = store.folder(run_dir, d)
        if io.exists(top):
            for p in io.list_files(top, suffix=".parquet"):
                found.add(p.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")])
    return sorted(found)


def forget_rows(run_dir: str, kind: str, list_url: str) -> dict[str, Any]:
    """The whole `curate forget`: store the keys, clean every shard, rewrite every selection,
    record the request. Returns the request record (with "reconciles" of the rewritten selections)."""
    fs, p = io.fs_and_path(list_url)
    if fs.isdir(p):
        raise ValueError(f"{list_url} is a folder; give a file with one identifier a line")
    with fs.open(p, "rb") as f:
        data = f.read()
    entries = parse_list(data, kind, list_url)  # validated before the run directory is touched
    manifest.read(run_dir)  # a clear error for a folder that is not a run, before a lock file is made there
    with run_lock.hold(run_dir):  # no run, select or other forget writes meanwhile
        return _forget_rows(run_dir, kind, data, entries)


def _forget_rows(run_dir: str, kind: str, data: bytes, entries: list[str]) -> dict[str, Any]:
    m = manifest.read(run_dir)
    t0 = time.time()
    add_keys(run_dir, keys_for(kind, entries))  # first: whatever happens next, later runs apply them
    keys = load_keys(run_dir)
    assert keys is not None or not entries

    by_shard: dict[str, int] = {}
    side: dict[str, int] = {"work": 0, "images": 0, "embeddings": 0}
    known = set(keys.uids) if keys else set()
    while keys:
        resolved: set[str] = set()
        for shard in _shards_with_files(run_dir):
            res = clean_shard(run_dir, shard, keys)
            if res["rows"]:
                by_shard[shard] = by_shard.get(shard, 0) + res["rows"]
            for k in side:
                side[k] += res[k]
            resolved |= {u.lower() for u in res["uids"]}
        # the uids of the rows a URL or sha256 matched become keys too: selection-time exclusion
        # works on uids, and a row with the same uid (same URL and caption, e.g. never fetched)
        # is the same pair: a second pass removes it
        new = resolved - known
        if not new:
            break
        add_keys(run_dir, _keys_frame(("uid", u) for u in sorted(new)))
        known |= new
        keys = load_keys(run_dir)

    # every selection, rewritten from the cleaned annotations with the rules it was made with
    spec = PipelineSpec.model_validate(m.spec)
    sel_root = store.selections_dir(run_dir)
    names = set(m.selections)
    if io.exists(sel_root):
        fs_, sp = io.fs_and_path(sel_root)
        names |= {x.rstrip("/").rsplit("/", 1)[-1] for x in fs_.ls(sp, detail=False) if fs_.isdir(x)}
    names = {n for n in names if is_name(n)}  # not curate's staging folders (curate/publish.py)
    rewritten, dropped, reconciles = [], [], True
    have_annotations = bool(annotations.completed_shards(run_dir))
    for name in sorted(names):
        sj = io.join(selection.readable_dir(run_dir, name), "selection.json")
        rules = io.read_json(sj)["rules"] if io.exists(sj) else m.selection_specs.get(name)
        if rules is None and name not in m.selections:
            continue  # a folder curate did not write: not ours to rewrite or delete
        if rules is None or not have_annotations:
            # cannot be rebuilt, and may hold forgotten rows: curate's files go (refused if others are there)
            publish.unpublish(selection.selection_dir(run_dir, name), selection.owned)
            dropped.append(name)
            continue
        summary = selection.write_selection(run_dir, SelectionConfig.model_validate(rules), spec.report)
        rewritten.append(name)
        reconciles = reconciles and bool(summary["reconciles"])

    record = {
        "at": manifest.now(),
        "kind": kind,
        "list_sha256": hashlib.sha256(data).hexdigest(),
        "entries": len(entries),
        "rows_removed": sum(by_shard.values()),
        "rows_removed_by_shard": by_shard,
        "side_rows_removed": side,
        "selections_rewritten": rewritten,
        "selections_removed": dropped,
        "seconds": round(time.time() - t0, 3),
    }
    log = read_log(run_dir) + [record]
    io.write_json(log_path(run_dir), log)

    m = manifest.read(run_dir)  # write_selection has updated it
    m["forget_requests"] = log
    m["deletion_lists"] = describe_lists(run_dir)
    accounting.refresh_counts(run_dir, m)  # clean_shard rewrote the markers
    manifest.record_outputs(run_dir, m)
    manifest.write(run_dir, m)
    return {**record, "reconciles": reconciles}
