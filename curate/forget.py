"""`curate forget`: deletion requests. Removes rows (by uid, URL or image sha256) from every derived
artifact of a run directory, keeps them out of every later run and selection, and counts them.

What is kept in RUN_DIR/forget/ (never the raw URLs):
    keys.parquet    kind, key: "uid" (lower-case uid), "sha256" (lower-case hex of the image bytes),
                    "url" / "url_normalized" (sha256 of the URL as given / as normalize_url makes it).
                    The uids of rows a URL or sha256 request removed are added as "uid" keys too.
    requests.json   one record per request: time, kind, sha256 of the list file, entries, rows
                    removed per shard (never the identifiers themselves); copied into the manifest.

Where the keys apply:
    curate forget   annotations/, images/, embeddings/, _work/ of every shard, then every selection
                    is rewritten from the cleaned annotations (write_selection: no model, no network).
    curate run      prepare_shard drops matching rows right after reading an input shard and
                    after fetching (image sha256), and cleans a finished shard before reusing it.
    selection       annotations.scan leaves out rows matching a uid or sha256 key (defence in depth:
                    after `curate forget` the annotations hold none).

Run it when no `curate run` writes to the same directory (the runner rewrites the manifest at its
end; a shard finished during the forget is caught by the next run or forget, not by this one).

Accounting: a shard's completion marker has rows_read (rows in the input shard), rows (rows in its
annotation file) and forgotten; rows + forgotten == rows_read, and a selection's
kept + removed + forgotten == rows_read per shard and in total (selection.json, report.json).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import annotations, io, schema, store

KINDS = ("uids", "urls", "sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def forget_dir(run_dir: str) -> str:
    return store.forget_dir(run_dir)


def keys_path(run_dir: str) -> str:
    return io.join(forget_dir(run_dir), "keys.parquet")


def log_path(run_dir: str) -> str:
    return io.join(forget_dir(run_dir), "requests.json")


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


# --- the persisted key set ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    uids: frozenset[str]
    sha256: frozenset[str]
    url: frozenset[str]  # sha256 of raw URLs
    url_normalized: frozenset[str]  # sha256 of normalize_url(URL)

    def __bool__(self) -> bool:
        return bool(self.uids or self.sha256 or self.url or self.url_normalized)

    @classmethod
    def from_frame(cls, df: pl.DataFrame) -> "Keys":
        def of(kind: str) -> frozenset[str]:
            return frozenset(df.filter(pl.col("kind") == kind).get_column("key").to_list())

        return cls(of("uid"), of("sha256"), of("url"), of("url_normalized"))


def _keys_frame(rows: Iterable[tuple[str, str]]) -> pl.DataFrame:
    rows = list(rows)
    return pl.DataFrame(
        {"kind": [k for k, _ in rows], "key": [v for _, v in rows]}, schema={"kind": pl.String, "key": pl.String}
    )


def load_keys(run_dir: str) -> Keys | None:
    """Every key forgotten in this run directory, or None when nothing ever was."""
    p = keys_path(run_dir)
    if not io.exists(p):
        return None
    keys = Keys.from_frame(pl.from_arrow(io.read_parquet(p)))
    return keys or None


def add_keys(run_dir: str, new: pl.DataFrame) -> None:
    p = keys_path(run_dir)
    if new.height == 0 and io.exists(p):
        return
    df = new
    if io.exists(p):
        df = pl.concat([pl.from_arrow(io.read_parquet(p)), new])
    df = df.unique().sort("kind", "key")
    io.write_parquet(p, df.to_arrow())


def parse_list(data: bytes, kind: str, source: str = "<list>") -> list[str]:
    """One identifier per line; blank lines and lines starting with '#' are skipped. uids and sha256
    are compared lower-case (the read stage lower-cases uids); URLs exactly, and normalised.
    Every line is checked, so a wrong file is an error naming it and the line, never a list of
    junk "identifiers": a UTF-8 text file (a leading BOM is allowed), URLs are http(s) URLs with a
    host and no control characters, uids 32 hex characters, sha256 64."""
    from urllib.parse import urlsplit

    if kind not in KINDS:
        raise ValueError(f"unknown forget list kind {kind!r}; one of {KINDS}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{source}: not a UTF-8 text file ({e.reason} at byte {e.start}); a {kind} list is one entry per line"
        ) from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        v = line.strip()
        if not v or v.startswith("#"):
            continue
        if kind in ("uids", "sha256"):
            v = v.lower()
        if kind == "sha256" and not _HEX64.match(v):
            raise ValueError(f"{source}:{i}: not a hex sha256: {v[:80]!r}")
        if kind == "uids" and not re.fullmatch(r"[0-9a-f]{32}", v):
            raise ValueError(f"{source}:{i}: not a uid (32 hex characters): {v[:80]!r}")
        if kind == "urls":
            try:
                parts = urlsplit(v)
                ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
            except ValueError:
                ok = False
            if not ok or not v.isprintable():  # a space may be part of a raw web URL; a tab, NUL, ... not
                raise ValueError(f"{source}:{i}: not an http(s) URL: {v[:80]!r}")
        out.append(v)
    return out


def keys_for(kind: str, entries: list[str]) -> pl.DataFrame:
    from curate.urls import normalize_url

    if kind == "uids":
        return _keys_frame(("uid", e) for e in entries)
    if kind == "sha256":
        return _keys_frame(("sha256", e) for e in entries)
    rows = []
    for e in entries:
        rows.append(("url", url_key(e)))
        n = normalize_url(e)
        if n:
            rows.append(("url_normalized", url_key(n)))
    return _keys_frame(rows)


# --- matching ---------------------------------------------------------------------------------------
def match(df: pl.DataFrame, keys: Keys) -> pl.Series:
    """True for rows a key matches: uid, image sha256 (fetched or the input's expected sha256),
    the URL as given, or the URL as curate's annotate stage normalises it."""
    mask = pl.Series([False] * df.height, dtype=pl.Boolean)
    cols = set(df.columns)
    if keys.uids and schema.UID in cols:
        mask = mask | df.get_column(schema.UID).str.to_lowercase().is_in(list(keys.uids)).fill_null(False)
    if keys.sha256:
        for c in (schema.IMAGE_SHA256, schema.EXPECTED_SHA256):
            if c in cols:
                mask = mask | df.get_column(c).str.to_lowercase().is_in(list(keys.sha256)).fill_null(False)
    if (keys.url or keys.url_normalized) and schema.URL in cols:
        from curate.urls import normalize_url

        urls = df.get_column(schema.URL).to_list()
        if schema.URL_NORMALIZED in cols and df.get_column(schema.URL_NORMALIZED).null_count() < df.height:
            norms = df.get_column(schema.URL_NORMALIZED).to_list()
        else:
            norms = [normalize_url(u) for u in urls]
        hit = [
            (u is not None and url_key(u) in keys.url) or (n is not None and url_key(n) in keys.url_normalized)
            for u, n in zip(urls, norms)
        ]
        mask = mask | pl.Series(hit, dtype=pl.Boolean)
    return mask


def exclude_expr(keys: Keys, names: Iterable[str]) -> pl.Expr:
    """A lazy filter for annotation scans: rows matching a uid or sha256 key (URL keys need
    hashing and apply where rows enter a run: prepare_shard)."""
    names = set(names)
    hit = pl.lit(False)
    if keys.uids and schema.UID in names:
        hit = hit | pl.col(schema.UID).is_in(list(keys.uids)).fill_null(False)
    if keys.sha256:
        for c in (schema.IMAGE_SHA256, schema.EXPECTED_SHA256):
            if c in names:
                hit = hit | pl.col(c).is_in(list(keys.sha256)).fill_null(False)
    return hit


# --- hooks for the run (curate/shard_jobs.py) -------------------------------------------------------
def drop_at_read(table: pa.Table, keys: Keys | None) -> tuple[pa.Table, dict[str, int]]:
    """Right after read_shard: drop forgotten rows (row numbers stay the input positions).
    Returns the table and {"rows_read", "forgotten"} for the shard's counts."""
    n = table.num_rows
    if not keys or n == 0:
        return table, {"rows_read": n, "forgotten": 0}
    hit = match(pl.from_arrow(table), keys)
    k = int(hit.sum())
    if k:
        table = table.filter(pa.array((~hit).to_numpy()))
    return table, {"rows_read": n, "forgotten": k}


def drop_fetched(ann: pl.DataFrame, images: pa.Table, keys: Keys | None) -> tuple[pl.DataFrame, pa.Table, int]:
    """After a fetch: rows whose fetched image's sha256 is forgotten leave the annotations and
    the images table before anything is written."""
    if not keys or not keys.sha256:
        return ann, images, 0
    hit = match(ann, keys)
    if not hit.any():
        return ann, images, 0
    rows = ann.filter(hit).get_column(schema.ROW)
    keep = pc.invert(pc.is_in(images.column(schema.ROW), value_set=rows.to_arrow().cast(pa.int64())))
    return ann.filter(~hit), images.filter(keep), int(hit.sum())


def marker_counts(run_dir: str, shard: str) -> dict[str, int]:
    """rows_read and forgotten of a finished shard, to carry into a rewritten marker."""
    mk = io.read_json(annotations.marker_path(run_dir, shard))
    return {"rows_read": rows_read(mk), "forgotten": int(mk.get("forgotten", 0))}


def rows_read(marker: dict) -> int:
    """Rows in the input shard (markers written before `curate forget` existed: rows)."""
    return int(marker.get("rows_read", int(marker["rows"]) + int(marker.get("forgotten", 0))))


# --- cleaning a run directory -----------------------------------------------------------------------
def _side_paths(run_dir: str, shard: str) -> dict[str, str]:
    return {
        "work": store.work_path(run_dir, shard),
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
    """Remove matching rows from one shard's files: _work/, images/ and embeddings/ first, then the
    annotation file, then its marker (rows, forgotten, scored, fetch_status rewritten; rows_read
    kept). Idempotent, and safe to repeat after a crash at any point: the keys are already stored,
    and a marker that disagrees with its annotation file is rewritten. Returns {"rows": removed
    annotation rows, "uids": their uids, per-file counts}."""
    side = _side_paths(run_dir, shard)
    ann_path = annotations.shard_path(run_dir, shard)
    rows: set[int] = set()
    uids: set[str] = set()
    ann = None
    if io.exists(ann_path):
        ann_t = io.read_parquet(ann_path)
        ann = pl.from_arrow(ann_t)
        hit = match(ann, keys)
        rows |= set(ann.filter(hit).get_column(schema.ROW).to_list())
        uids |= set(x for x in ann.filter(hit).get_column(schema.UID).to_list() if x)
    work = None
    if io.exists(side["work"]):
        work = pl.from_arrow(io.read_parquet(side["work"]))
        whit = match(work, keys)
        rows |= set(work.filter(whit).get_column(schema.ROW).to_list())
        uids |= set(x for x in work.filter(whit).get_column(schema.UID).to_list() if x)
    out: dict[str, Any] = {"shard": shard, "rows": 0, "uids": sorted(uids)}
    for name, p in side.items():
        out[name] = _drop_rows(p, rows)
    removed = 0
    if ann is not None:
        removed = _drop_rows(ann_path, rows)
        out["rows"] = removed
    mpath = annotations.marker_path(run_dir, shard)
    if io.exists(mpath):
        mk = io.read_json(mpath)
        height = ann.height - removed if ann is not None else int(mk["rows"])
        if removed or int(mk["rows"]) != height:
            final = pl.from_arrow(io.read_parquet(ann_path, columns=[schema.FETCH_STATUS, schema.CLIP_SCORE]))
            read = rows_read(mk)
            mk.update(
                {
                    "rows": final.height,
                    "rows_read": read,
                    "forgotten": read - final.height,
                    "scored": int(final.get_column(schema.CLIP_SCORE).is_not_null().sum()),
                    "fetch_status": {k: int(v) for k, v in final.get_column(schema.FETCH_STATUS).value_counts().rows()},
                }
            )
            io.write_json(mpath, mk)
    return out


def _shards_with_files(run_dir: str) -> list[str]:
    found: set[str] = set()
    for d in store.SHARD_DIRS:
        top = store.folder(run_dir, d)
        if io.exists(top):
            for p in io.list_files(top, suffix=".parquet"):
                found.add(p.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")])
    return sorted(found)


def describe_lists(run_dir: str) -> list[dict[str, Any]]:
    """The deletion lists this run directory applies, for the manifest: path, bytes, sha256."""

    p = keys_path(run_dir)
    if not io.exists(p):
        return []
    info = io.describe_file(p)
    df = pl.from_arrow(io.read_parquet(p))
    by_kind = {k: int(v) for k, v in df.get_column("kind").value_counts().rows()}
    return [{"path": p, "bytes": info["bytes"], "sha256": io.sha256_file(p), "keys": by_kind}]


def read_log(run_dir: str) -> list[dict[str, Any]]:
    p = log_path(run_dir)
    return io.read_json(p) if io.exists(p) else []


def forget_rows(run_dir: str, kind: str, list_url: str) -> dict[str, Any]:
    """The whole `curate forget`: store the keys, clean every shard, rewrite every selection,
    record the request. Returns the request record (with "reconciles" of the rewritten selections)."""
    from curate import run_lock

    fs, p = io.fs_and_path(list_url)
    if fs.isdir(p):
        raise ValueError(f"{list_url} is a folder; give a file with one identifier a line")
    with fs.open(p, "rb") as f:
        data = f.read()
    entries = parse_list(data, kind, list_url)  # validated before the run directory is touched
    with run_lock.hold(run_dir):  # no run, select or other forget writes meanwhile
        return _forget_rows(run_dir, kind, data, entries)


def _forget_rows(run_dir: str, kind: str, data: bytes, entries: list[str]) -> dict[str, Any]:
    from curate import manifest, publish, selection
    from curate.config import PipelineSpec, SelectionConfig
    from curate.selection import write_selection

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
    spec = PipelineSpec.model_validate(m["spec"])
    sel_root = store.selections_dir(run_dir)
    names = set(m.get("selections", []))
    if io.exists(sel_root):
        fs_, sp = io.fs_and_path(sel_root)
        names |= {x.rstrip("/").rsplit("/", 1)[-1] for x in fs_.ls(sp, detail=False) if fs_.isdir(x)}
    names = {n for n in names if _is_selection_name(n)}  # not curate's staging folders (curate/publish.py)
    rewritten, dropped, reconciles = [], [], True
    have_annotations = bool(annotations.completed_shards(run_dir))
    for name in sorted(names):
        sj = io.join(selection.readable_dir(run_dir, name), "selection.json")
        rules = io.read_json(sj)["rules"] if io.exists(sj) else (m.get("selection_specs") or {}).get(name)
        if rules is None and name not in m.get("selections", []):
            continue  # a folder curate did not write: not ours to rewrite or delete
        if rules is None or not have_annotations:
            # cannot be rebuilt, and may hold forgotten rows: curate's files go (refused if others are there)
            publish.unpublish(selection.selection_dir(run_dir, name), selection.owned)
            dropped.append(name)
            continue
        summary = write_selection(run_dir, SelectionConfig.model_validate(rules), spec.report)
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
    _refresh_counts(run_dir, m)
    manifest.record_outputs(run_dir, m)
    manifest.write(run_dir, m)
    return {**record, "reconciles": reconciles}


def _refresh_counts(run_dir: str, m: dict[str, Any]) -> None:
    """The manifest's per-shard and total rows/forgotten, from the (rewritten) markers."""
    tot_rows = tot_forgotten = 0
    for shard in annotations.completed_shards(run_dir):
        mk = io.read_json(annotations.marker_path(run_dir, shard))
        entry = m.setdefault("shards", {}).setdefault(shard, {})
        entry.update({"rows": int(mk["rows"]), "rows_read": rows_read(mk), "forgotten": int(mk.get("forgotten", 0))})
        tot_rows += int(mk["rows"])
        tot_forgotten += int(mk.get("forgotten", 0))
    if m.get("counts"):
        m["counts"]["rows"] = tot_rows
        m["counts"]["forgotten"] = tot_forgotten


def _is_selection_name(name: str) -> bool:
    from curate.names import check_name

    try:
        check_name(name, "selection name")
        return True
    except ValueError:
        return False


# --- accounting in selections and reports -------------------------------------------------------------
def reconcile_report(
    report: dict[str, Any], run_dir: str, shards: list[str], excluded: dict[str, int] | None = None
) -> dict[str, Any]:
    """Add forgotten rows to a selection report and check kept + removed + forgotten == rows_read
    per shard and in total (rows_read and forgotten from the completion markers; `excluded`: rows
    the selection-time filter left out, which count as forgotten too). Adds totals.forgotten,
    totals.rows_read and per shard the same; a mismatch is a problem and the report does not
    reconcile. Returns {shard: {rows_read, forgotten}}."""
    from concurrent.futures import ThreadPoolExecutor

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
