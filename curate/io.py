"""Filesystem access through fsspec: local paths and bucket URLs (s3://, gs://, ...) alike.

Every write that a reader could observe half-done goes through `atomic_write_*`: local files are
written to a temporary name and renamed; object stores publish an object only when the upload
completes, so a plain write there is already all-or-nothing.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import hashlib


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def sha256_file(url: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file (local or bucket), streamed in chunks (checkpoints and image
    shards can be gigabytes)."""
    fs, p = fs_and_path(str(url))
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_local(url: str) -> bool:
    fs, _ = fs_and_path(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    fs.makedirs(path, exist_ok=True)


def _unprotocol(fs: fsspec.AbstractFileSystem, url: str, found: str) -> str:
    """fsspec's glob/ls drop the protocol; put it back so the path can be opened anywhere."""
    if "://" in url and "://" not in found:
        proto = url.split("://", 1)[0]
        return f"{proto}://{found}"
    return found


def list_files(url: str, suffix: str = ".parquet") -> list[str]:
    """Files under a directory, matching a glob, or the file itself; sorted, protocol kept."""
    fs, path = fs_and_path(url)
    if any(ch in path for ch in "*?["):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(suffix)]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"{url}: no such file or directory")
    return sorted(_unprotocol(fs, url, p) for p in found)


def atomic_write_bytes(url: str, data: bytes) -> dict[str, Any]:
    return atomic_write_chunks(url, [data])


def atomic_write_chunks(url: str, chunks: Iterable[bytes]) -> dict[str, Any]:
    """Write the chunks as one file that appears whole or not at all: a local temp file renamed
    over the target, or one bucket object (an upload is published when it completes). A failure
    while the chunks are produced leaves the old file, and no temp file. Returns the file's
    {bytes, sha256}, hashed as it was written (the run manifest records it without reading the
    file again: curate/manifest.py record_outputs)."""
    h, size = hashlib.sha256(), 0

    def hashed():
        nonlocal size
        for c in chunks:
            h.update(c)
            size += len(c)
            yield c

    _write_whole(url, hashed())
    return {"bytes": size, "sha256": h.hexdigest()}


def _write_whole(url: str, chunks: Iterable[bytes]) -> None:
    fs, path = fs_and_path(url)
    parent = posixpath.dirname(path) if "://" in url else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(url):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):  # a failed write leaves no temp file behind
                os.unlink(tmp)
    else:
        f = fs.open(path, "wb")
        try:
            for c in chunks:
                f.write(c)
        except BaseException:
            # closing would publish what was written so far: abort the upload instead
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            raise
        f.close()


def atomic_write_text(url: str, text: str) -> dict[str, Any]:
    return atomic_write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> dict[str, Any]:
    return atomic_write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(url: str) -> Any:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def write_parquet(
    url: str, table: pa.Table, row_group_size: int | None = None, stored_columns: Iterable[str] = ()
) -> dict[str, Any]:
    """`table` to `url` atomically, zstd-compressed except `stored_columns` (bytes that are already
    compressed, such as JPEGs: zstd would spend CPU on them for nothing). Returns {bytes, sha256}."""
    buf = io.BytesIO()
    pq.write_table(
        table, buf, compression=_compression(table.schema, set(stored_columns)), row_group_size=row_group_size
    )
    return atomic_write_bytes(url, buf.getvalue())


def _compression(schema: pa.Schema, stored: set[str]) -> str | dict[str, str]:
    """ "zstd", or per parquet column path when some top-level columns are stored as they are
    (pyarrow leaves a column that a dict does not name uncompressed, so every path is named)."""
    if not stored & set(schema.names):
        return "zstd"
    probe = io.BytesIO()
    pq.write_table(schema.empty_table(), probe)
    paths = pq.ParquetFile(pa.BufferReader(probe.getvalue())).schema
    return {
        paths.column(i).path: ("none" if paths.column(i).path.split(".")[0] in stored else "zstd")
        for i in range(len(paths))
    }


def read_parquet(url: str, columns: Iterable[str] | None = None) -> pa.Table:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        try:
            return pq.read_table(f, columns=list(columns) if columns is not None else None)
        except (pa.ArrowInvalid, OSError) as e:  # pyarrow names the buffer, not the file
            raise ValueError(f"{url}: not a readable parquet file ({e})") from None


def read_row_group(url: str, index: int) -> pa.Table:
    """Row group `index` of a parquet file (a window of rows, without reading the others)."""
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            if not 0 <= index < pf.num_row_groups:
                raise ValueError(f"{url}: has {pf.num_row_groups} row group(s), no row group {index}")
            return pf.read_row_group(index)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{url}: not a readable parquet file ({e})") from None


def describe_file(url: str) -> dict:
    """Path, size and a version tag for the audit trail: the object's ETag on a bucket, the
    modification time on a local disk (whatever the filesystem reports; None when it has none)."""
    fs, path = fs_and_path(url)
    info = fs.info(path)
    return {"path": url, "bytes": int(info.get("size") or 0), "version": version_tag(info)}


def version_tag(info: dict) -> str | None:
    """The version of a file from an fsspec info/find record: its ETag on a bucket (quotes
    stripped), else the modification time a local disk reports, else None. One rule for the audit
    trail's inputs and outputs."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return str(info["mtime"]) if info.get("mtime") is not None else None


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
