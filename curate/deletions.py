"""Deletion requests as data: the keys `curate forget` stores (RUN_DIR/forget/, never the raw
identifiers), matching rows against them, and the hooks that keep forgotten rows out of a run
(at read, after fetch) and out of every annotation scan. A leaf: it imports no other stage, so
annotations, the run and the selection can all apply the keys (curate/forget.py is the command
that cleans files and rewrites selections; curate/accounting.py counts forgotten rows).

    keys.parquet    kind, key: "uid" (lower-case uid), "sha256" (lower-case hex of the image bytes),
                    "url" / "url_normalized" (sha256 of the URL as given / as normalize_url makes it).
    requests.json   one record per request (time, kind, sha256 of the list file, entries, rows
                    removed per shard), copied into the manifest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import io, schema, store
from curate.urls import normalize_url
from urllib.parse import urlsplit

KINDS = ("uids", "urls", "sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def keys_path(run_dir: str) -> str:
    return io.join(store.forget_dir(run_dir), "keys.parquet")


def log_path(run_dir: str) -> str:
    return io.join(store.forget_dir(run_dir), "requests.json")


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


def rows_read(marker: dict) -> int:
    """Rows in the input shard (markers written before `curate forget` existed: rows)."""
    return int(marker.get("rows_read", int(marker["rows"]) + int(marker.get("forgotten", 0))))


# --- cleaning a run directory -----------------------------------------------------------------------


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
