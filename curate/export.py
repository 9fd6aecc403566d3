"""`curate export`: a selection (or the rows of a DataComp uid list) as training shards: webdataset
tars laid out as img2dataset writes them, or parquet pairs ready for an img2dataset re-download.
The layout is in curate/export_layout.py, the rows and images come from curate/export_source.py;
this module plans the output shards and runs one task per shard through the executor.

- The driver never holds the rows: it plans from per-input-shard counts (selection.json, or one
  count task per input shard for a uid list). Output shard k holds rows k*N .. (k+1)*N-1 of the
  export's stable order (input shard order, then row), so a rerun assigns every row to the same
  shard and key and writes the same bytes.
- Exactly once: a shard task writes its files atomically and its marker (sizes and sha256 of
  those files, and the export's fingerprint: source, settings, counts) last. A task whose marker
  is there, fingerprint equal and files of the sizes it names, returns at once; any other shard is
  written again. `_export.json` is removed when an export starts and written when it is whole.
- A row whose image is not in the run's cache is not dropped: it is in its shard's index with
  status failed_to_download, in `_missing.parquet`, and counted (exported + missing = rows).
- The output folder is refused when it holds a file curate export does not write, and only
  curate's own names are ever deleted there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from curate import annotations, faults, io, publish, store
from curate import export_layout as layout
from curate.default_executor import given_or_ray
from curate.executor import Executor, Resources, describe_error
from curate.export_source import (
    Source,
    cached_images,
    count_matches,
    load_uid_file,
    selection_created_at,
    selection_source,
    shard_rows,
)
from curate.schema import EXPECTED_SHA256, IMAGE_SHA256

TASK = Resources(cpus=1)


@dataclass(frozen=True)
class Piece:
    """Rows start..stop-1 of what input shard `shard` exports (`total` rows in all: checked when read)."""

    shard: str
    total: int
    start: int
    stop: int


@dataclass(frozen=True)
class Job:
    """Output shard `index`: its pieces, in the export's order."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


@dataclass(frozen=True)
class Settings:
    to: str
    fmt: str
    shard_size: int
    fingerprint: str  # what a marker must name for its shard to be kept


def plan(counts: list[tuple[str, int]], shard_size: int) -> list[Job]:
    """Cut the export's rows (input shards in the given order, each its count of rows) into
    output shards of `shard_size` rows (the last one shorter)."""
    jobs: list[Job] = []
    pieces: list[Piece] = []
    filled = 0
    for shard, n in counts:
        start = 0
        while start < n:
            take = min(n - start, shard_size - filled)
            pieces.append(Piece(shard, n, start, start + take))
            filled, start = filled + take, start + take
            if filled == shard_size:
                jobs.append(Job(len(jobs), tuple(pieces)))
                pieces, filled = [], 0
    if pieces:
        jobs.append(Job(len(jobs), tuple(pieces)))
    return jobs


def fingerprint(source: Source, fmt: str, shard_size: int, counts: list[tuple[str, int]], about: dict) -> str:
    """What the files of every shard depend on: layout version, format, shard size, the run and the
    source (a selection's creation time; a uid file's distinct uids), the per-shard counts."""
    ident = {
        "layout": layout.LAYOUT_VERSION,
        "format": fmt,
        "shard_size": shard_size,
        "run_dir": source.run_dir,
        "source": source.describe(),
        "version": about.get("created_at") or about.get("sha256"),
        "counts": counts,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# --- one output shard (a task) ---------------------------------------------------------------------
def export_shard(source: Source, settings: Settings, job: Job, wanted: np.ndarray | None) -> dict:
    """Write output shard `job` (its files, then its marker), or return at once when its marker
    vouches for files that are there. Returns {index, rows, exported, missing, skipped}."""
    done = _completed(settings, job)
    if done is not None:
        return {**done, "skipped": True}
    metas = _metas(source, job, settings.shard_size, wanted)
    if settings.fmt == "parquet":
        name = layout.index_name(job.index)
        files = {name: io.atomic_write_bytes(_at(settings, name), _pairs(metas))}
        counts = {"rows": len(metas), "exported": len(metas), "missing": 0}
    else:
        files, counts = _write_webdataset(source, settings, job, metas)
    faults.fire("export.before_marker", layout.shard_name(job.index))
    marker = {
        "shard": layout.shard_name(job.index),
        "fingerprint": settings.fingerprint,
        "files": files,
        **counts,
    }
    io.write_json(_at(settings, layout.marker_name(job.index)), marker)
    return {"index": job.index, **counts, "skipped": False}


def _at(settings: Settings, name: str) -> str:
    return io.join(settings.to, name)


def _completed(settings: Settings, job: Job) -> dict | None:
    """The shard's counts when its marker is for this export and its files are all there with the
    sizes the marker names; None when the shard is to be written (again)."""
    path = _at(settings, layout.marker_name(job.index))
    try:
        marker = io.read_json(path)
        if marker.get("fingerprint") != settings.fingerprint:
            return None
        files = marker["files"]
        if sorted(files) != sorted(layout.shard_files(settings.fmt, job.index)):
            return None
        for name, digest in files.items():
            fs, file = io.fs_and_path(_at(settings, name))
            if int(fs.info(file)["size"]) != int(digest["bytes"]):
                return None
        return {
            "index": job.index,
            "rows": marker["rows"],
            "exported": marker["exported"],
            "missing": marker["missing"],
        }
    except (FileNotFoundError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _metas(source: Source, job: Job, shard_size: int, wanted: np.ndarray | None) -> list[dict[str, Any]]:
    """One metadata dict per row of the job (export_layout.META_FIELDS, status still unset)."""
    metas: list[dict[str, Any]] = []
    for piece in job.pieces:
        rows = shard_rows(source, piece.shard, wanted)
        if rows.num_rows != piece.total:
            raise RuntimeError(
                f"input shard {piece.shard}: {rows.num_rows} rows to export where the plan counted {piece.total} "
                f"({_where(source, piece.shard)}); the run or the selection changed during the export: run it again"
            )
        for r in rows.slice(piece.start, piece.stop - piece.start).to_pylist():
            meta: dict[str, Any] = {}
            for name, _, column in layout.META_FIELDS:
                if name == "key":
                    meta[name] = layout.key_of(job.index, len(metas), shard_size)
                elif name == "sha256":
                    meta[name] = r[IMAGE_SHA256] or r[EXPECTED_SHA256]
                else:
                    meta[name] = layout.finite_or_none(r[column]) if column else None
            metas.append(meta)
    return metas


def _where(source: Source, shard: str) -> str:
    if source.kind == "uids":
        return f"rows of {annotations.shard_path(source.run_dir, shard)} listed in {source.uids_file}"
    return f"selection {source.selection!r} at {source.selection_dir}, shard {shard}"


def _write_webdataset(source: Source, settings: Settings, job: Job, metas: list[dict]) -> tuple[dict, dict]:
    """The tar (images streamed one input shard at a time), then the index and the stats."""
    i = job.index
    files = {layout.tar_name(i): io.atomic_write_chunks(_at(settings, layout.tar_name(i)), _tar(source, job, metas))}
    errors = Counter(m["error_message"] for m in metas if m["status"] != layout.SUCCESS)
    missing = sum(errors.values())
    exported = len(metas) - missing
    files[layout.index_name(i)] = io.atomic_write_bytes(
        _at(settings, layout.index_name(i)), _parquet(metas, layout.META_SCHEMA)
    )
    stats = layout.stats(len(metas), exported, dict(errors))
    files[layout.stats_name(i)] = io.atomic_write_bytes(
        _at(settings, layout.stats_name(i)), json.dumps(stats, indent=4).encode()
    )
    return files, {"rows": len(metas), "exported": exported, "missing": missing}


def _tar(source: Source, job: Job, metas: list[dict]) -> Iterator[bytes]:
    """The shard's tar: one sample per row with a cached image; each row's status is set as it goes."""

    def samples():
        at = 0
        for piece in job.pieces:
            part = metas[at : at + piece.stop - piece.start]
            at += len(part)
            images = cached_images(source.run_dir, piece.shard, [m["source_row"] for m in part])
            for m in part:
                jpg = images.get(m["source_row"])
                if jpg is None:
                    m["status"] = layout.FAILED
                    m["error_message"] = f"no image in the run's cache {store.images_path(source.run_dir, piece.shard)}"
                    continue
                m["status"] = layout.SUCCESS
                yield m["key"], {"jpg": jpg, "json": layout.sample_json(m), "txt": layout.sample_txt(m["caption"])}

    return layout.tar_chunks(samples())


def _pairs(metas: list[dict]) -> bytes:
    return _parquet([{k: m[k] for k in layout.PAIR_SCHEMA.names} for m in metas], layout.PAIR_SCHEMA)


def _parquet(records: list[dict], schema: pa.Schema) -> bytes:
    buf = _io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), buf, compression="zstd")
    return buf.getvalue()


# --- the driver --------------------------------------------------------------------------------------
def export(
    run_dir: str,
    to: str,
    fmt: str = "webdataset",
    *,
    selection: str | None = None,
    uids: str | None = None,
    shard_size: int = layout.DEFAULT_SHARD_SIZE,
    executor: Executor | None = None,
) -> dict:
    """Export selection `selection` of the run (or the run's rows whose uid is in the DataComp uid
    file `uids`) into folder or bucket prefix `to` as `fmt` shards of `shard_size` rows. Returns
    what `_export.json` says, plus how many shards a rerun found complete (`skipped_shards`)."""
    _check_arguments(fmt, selection, uids, shard_size)
    run_dir, to = _normal(run_dir), _normal(to)
    if to == run_dir or to.startswith(f"{run_dir}/"):
        raise ValueError(f"{to} is inside the run directory {run_dir}: export to a folder of its own")
    publish.check_replaceable(to, layout.owned)  # before any work: a folder with files not ours is refused
    _check_claimed(to)
    ex = given_or_ray(executor)
    wanted = None
    if uids is not None:
        source, counts, about, wanted, not_found = _uid_source(ex, run_dir, uids)
    else:
        source, counts, about = selection_source(run_dir, selection)
    jobs = plan(counts, shard_size)
    settings = Settings(to, fmt, shard_size, fingerprint(source, fmt, shard_size, counts, about))
    io.write_json(_at(settings, layout.CLAIM), {"written_by": "curate export"})  # before any file it may delete
    _tidy(to, fmt, len(jobs))
    results = _run(ex, source, settings, jobs, wanted)
    if source.kind != "uids" and selection_created_at(source) != about.get("created_at"):
        raise RuntimeError(
            f"selection {selection!r} of {run_dir} was written again during the export: "
            "run the export again (it rewrites what changed)"
        )
    summary = _summary(source, settings, counts, about, results)
    if fmt == "webdataset":
        _write_missing(settings, jobs, results)
        io.write_json(_at(settings, layout.SIZES), {layout.tar_name(r["index"]): r["exported"] for r in results})
    if uids is not None:
        summary["counts"]["uids_not_found"] = int(len(not_found))
        io.atomic_write_bytes(_at(settings, layout.UIDS_NOT_FOUND), _npy(not_found))
    io.write_json(_at(settings, layout.SUMMARY), summary)  # last: the export is whole
    return {**summary, "skipped_shards": sum(r["skipped"] for r in results)}


def _normal(path: str) -> str:
    """A local path made absolute (the fingerprint and the messages do not depend on the working
    directory), a bucket URL without a trailing slash."""
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _check_arguments(fmt: str, selection: str | None, uids: str | None, shard_size: int) -> None:
    if fmt not in layout.FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(layout.FORMATS)}")
    if (selection is None) == (uids is None):
        raise ValueError("give a selection or a uid file (--uids), not both")
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: at least 1 row per shard")


def _uid_source(ex: Executor, run_dir: str, path: str):
    """The uid file loaded once by a task (the workers share its result), one count task per
    completed input shard, and the listed uids no row of the run has."""
    shards = annotations.completed_shards(run_dir)
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no completed annotation shards (annotations/*.done)")
    wanted, info_f = ex.submit(load_uid_file, path, resources=TASK, num_returns=2)
    try:
        about = ex.result(info_f)
    except Exception:
        with contextlib.suppress(Exception):  # the same error: collected, so that Ray does not report it again
            ex.result(wanted)
        raise
    found = np.zeros(about["distinct"], dtype=bool)
    futures = [ex.submit(count_matches, run_dir, shard, wanted, resources=TASK) for shard in shards]
    counts = []
    for shard, f in zip(shards, futures):
        n, positions = ex.result(f)
        counts.append((shard, n))
        found[positions] = True
    not_found = ex.result(wanted)[~found]
    about = {**about, "found": int(found.sum())}
    return Source(run_dir, "uids", uids_file=path), counts, about, wanted, not_found


def _check_claimed(to: str) -> None:
    """A folder that already holds files is an export's only when it holds the claim an export
    writes first: files named like ours in any other folder (an img2dataset pool: 00000.tar,
    00000.parquet, 00000_stats.json) are someone else's, and would be overwritten or deleted."""
    fs, top = io.fs_and_path(to)
    if not fs.exists(top):
        return
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.find(top))
    if names and layout.CLAIM not in names:
        raise publish.PublishError(
            f"{to} holds {len(names)} file(s) named like an export's ({', '.join(names[:5])}) but no "
            f"{layout.CLAIM}: curate export did not write them (an img2dataset pool?); export into a new "
            "folder (nothing was changed)"
        )


def _tidy(to: str, fmt: str, shards: int) -> None:
    """Before the shards are written: remove `_export.json` (the folder is no longer a whole
    export), temporary files of killed writes, the files of shards past the new plan and those of
    the other format. Only names curate export writes are touched."""
    fs, top = io.fs_and_path(to)
    if not fs.exists(top):
        return
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.find(top))
    keep = {n for i in range(shards) for n in (*layout.shard_files(fmt, i), layout.marker_name(i))}
    doomed = [layout.SUMMARY] if layout.SUMMARY in names else []
    for name in names:
        stale = layout.shard_index_of(name) is not None and name not in keep
        if layout.is_own_temp(name) or stale or name in (layout.MISSING, layout.SIZES, layout.UIDS_NOT_FOUND):
            doomed.append(name)
    for name in doomed:
        io.remove(io.join(to, name))


def _run(ex: Executor, source: Source, settings: Settings, jobs: list[Job], wanted) -> list[dict]:
    """One task per output shard, at most two per CPU in flight; results in shard order."""
    results: list[dict] = [{}] * len(jobs)
    pending: dict[Any, Job] = {}
    todo = iter(jobs)
    limit = max(2, 2 * int(ex.cluster.cpus))
    with _progress(len(jobs)) as bar:
        while True:
            while len(pending) < limit and (job := next(todo, None)) is not None:
                pending[ex.submit(export_shard, source, settings, job, wanted, resources=TASK)] = job
            if not pending:
                return results
            future = ex.wait_first(list(pending))
            job = pending.pop(future)
            try:
                results[job.index] = ex.result(future)
            except Exception as e:
                raise RuntimeError(
                    f"export shard {layout.shard_name(job.index)} (to {settings.to}) failed: {describe_error(e)}; "
                    "the shards written so far are kept: run the export again to finish it"
                ) from e
            bar.update(1)
            faults.fire("export.shard_done", layout.shard_name(job.index))


def _progress(total: int):
    return tqdm(total=total, desc="export", unit="shard", disable=os.environ.get("CURATE_PROGRESS", "1") == "0")


def _summary(source: Source, settings: Settings, counts, about: dict, results: list[dict]) -> dict:
    rows = sum(n for _, n in counts)
    exported = sum(r["exported"] for r in results)
    missing = sum(r["missing"] for r in results)
    c = {"rows": rows, "exported": exported, "missing": missing}
    ok = exported + missing == rows and sum(r["rows"] for r in results) == rows
    if source.kind == "uids":
        c.update(uids_listed=about["entries"], uids_distinct=about["distinct"], uids_found=about["found"])
    else:
        c["kept"] = about["kept"]
        ok = ok and rows == about["kept"]
    return {
        "format": settings.fmt,
        "shard_size": settings.shard_size,
        "run_dir": source.run_dir,
        "source": {**source.describe(), **{k: v for k, v in about.items() if k != "found"}},
        "shards": len(results),
        "per_shard": {
            layout.shard_name(r["index"]): {k: r[k] for k in ("rows", "exported", "missing")} for r in results
        },
        "counts": c,
        "reconciles": bool(ok),
        "fingerprint": settings.fingerprint,
        "layout": layout.LAYOUT_VERSION,
    }


def _write_missing(settings: Settings, jobs: list[Job], results: list[dict]) -> None:
    """`_missing.parquet`: the rows without a cached image, gathered from the shards' indexes one
    shard at a time and streamed into the file (never all in memory)."""

    def parts():
        for job, r in zip(jobs, results):
            if r["missing"]:
                index = io.read_parquet(_at(settings, layout.index_name(job.index)))
                gone = index.filter(pc.not_equal(index.column("status"), layout.SUCCESS))
                yield pa.table(
                    {
                        "uid": gone.column("uid"),
                        "shard": gone.column("source_shard"),
                        "row": gone.column("source_row"),
                        "url": gone.column("url"),
                        "tar": pa.array([layout.tar_name(job.index)] * gone.num_rows, pa.string()),
                        "key": gone.column("key"),
                        "error_message": gone.column("error_message"),
                    },
                    schema=layout.MISSING_SCHEMA,
                )

    def chunks():
        sink = layout.ChunkSink()
        with pq.ParquetWriter(sink, layout.MISSING_SCHEMA, compression="zstd") as writer:
            for table in parts():
                writer.write_table(table)
                yield from sink.drain()
        yield from sink.drain()

    io.atomic_write_chunks(_at(settings, layout.MISSING), chunks())


def _npy(pairs: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, pairs)
    return buf.getvalue()
