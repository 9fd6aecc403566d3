"""Publish a folder whole: its new version is written beside the old one and swapped in at once,
so a reader sees the old version complete or the new one complete, never a mixture, and a killed
or failed write leaves the old version in place. Selections are published this way
(curate/selection.py).

Local disks: the new version is built in a hidden sibling `.<name>.staging-<id>` and exchanged
with the old folder in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); the old version,
now in the staging name, is then deleted. Where the kernel or filesystem cannot exchange, the old
folder is parked as `.<name>.old-<id>` and the new one renamed in: for the instant between the two
renames `resolve()` reads the parked copy, and `recover()` (run by the next writer, under the run
lock) puts it back if the process died there.

Buckets (no rename): each version is written under `<name>/v-<id>/`, and `<name>/CURRENT.json`
(one object, written last; an object store publishes an object whole) names the version readers
use. `resolve()` follows it. Older versions are deleted after the pointer moves, keeping the one it
replaced for readers that resolved it just before.

Only names of these shapes are ever deleted here: curate's own staging, parked and version
folders. A folder of the old version that holds files `owned()` does not recognise (files a person
put there) is not replaced: `publish()` refuses and names them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import re
import shutil
import time
import uuid
from typing import Callable, TypeVar

from curate import faults, io

T = TypeVar("T")
POINTER = "CURRENT.json"
_STAGING = re.compile(r"^\.(?P<name>.+)\.staging-[0-9a-f]{32}$")
_PARKED = re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]{32}$")
_VERSION = re.compile(r"^v-\d{8}T\d{6}Z-[0-9a-f]{12}$")


def is_transient(entry: str) -> bool:
    """A staging or parked folder name of publish's own (`.<name>.staging-<id>`, `.<name>.old-<id>`)."""
    return bool(_STAGING.match(entry) or _PARKED.match(entry))


def is_version(entry: str) -> bool:
    """A bucket version prefix name of publish's own (`v-<time>-<id>`)."""
    return bool(_VERSION.match(entry))


class PublishError(RuntimeError):
    """The new version cannot replace the old one (nothing was changed)."""


def _split(final: str) -> tuple[str, str]:
    if "://" in final:
        parent, name = posixpath.split(final.rstrip("/"))
    else:
        parent, name = os.path.split(os.path.abspath(final))
    return parent, name


def resolve(final: str) -> str:
    """Where the published version of `final` can be read now (it may not exist)."""
    if io.is_local(final):
        if os.path.isdir(final):
            return final
        parent, name = _split(final)
        parked = sorted(p for p in _listdir(parent) if (m := _PARKED.match(p)) and m["name"] == name)
        return os.path.join(parent, parked[-1]) if parked else final
    pointer = io.join(final, POINTER)
    if io.exists(pointer):
        return io.join(final, io.read_json(pointer)["version"])
    return final


def publish(final: str, build: Callable[[str, str], T], owned: Callable[[str], bool]) -> T:
    """Build a new version of folder `final` and swap it in whole. `build(where, readable_at)`
    writes the new version's files under `where` and may record `readable_at`, the path the
    version will have once published. `owned(relative path)` says whether a file of the old
    version is one curate writes; an old version with any other file is refused before anything is
    written. Returns what `build` returns."""
    check_replaceable(final, owned)
    if io.is_local(final):
        return _publish_local(final, build)
    return _publish_bucket(final, build, owned)


def unpublish(final: str, owned: Callable[[str], bool]) -> None:
    """Delete folder `final` whole (a selection that cannot be rebuilt), refusing, with nothing
    changed, when it holds files `owned` does not recognise. Locally it is first renamed to a
    staging name, so a kill leaves either the whole folder or a staging folder recover() deletes."""
    check_replaceable(final, owned)
    if io.is_local(final):
        if os.path.isdir(final):
            parent, name = _split(final)
            doomed = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex}")
            os.rename(final, doomed)
            shutil.rmtree(doomed)
        return
    io.remove(io.join(final, POINTER))  # first: from here readers find no selection
    _remove_bucket_versions(final, owned)


def recover(parent: str) -> None:
    """Tidy what a killed publish left in `parent` (run this holding the run lock): put a parked
    old version back where its folder is missing; delete staging folders and parked versions that
    were replaced. Touches only names of curate's own staging/parked shapes."""
    if not io.is_local(parent) or not os.path.isdir(parent):
        return
    for entry in _listdir(parent):
        path = os.path.join(parent, entry)
        if (m := _PARKED.match(entry)) is not None:
            final = os.path.join(parent, m["name"])
            if not os.path.exists(final):
                os.rename(path, final)  # the process died between the two renames: the old version returns
            else:
                shutil.rmtree(path)
        elif _STAGING.match(entry):
            shutil.rmtree(path)  # an unfinished new version: never published


# --- local ---------------------------------------------------------------------------------------------
def _publish_local(final: str, build: Callable[[str, str], T]) -> T:
    final = os.path.abspath(final)
    parent, name = _split(final)
    os.makedirs(parent, exist_ok=True)
    recover(parent)
    staging = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex}")
    os.makedirs(staging)
    try:
        result = build(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves the old version alone
        raise
    _fsync_dir(staging)
    faults.fire("publish.before_swap", final)
    if not os.path.exists(final):
        os.rename(staging, final)
        _fsync_dir(parent)
        faults.fire("publish.after_swap", final)
    elif _exchange(staging, final):
        _fsync_dir(parent)
        faults.fire("publish.after_swap", final)
        shutil.rmtree(staging)  # holds the old version now
    else:  # no atomic exchange here: park the old version for an instant (resolve/recover know it)
        parked = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
        os.rename(final, parked)
        faults.fire("publish.between_renames", final)
        os.rename(staging, final)
        _fsync_dir(parent)
        faults.fire("publish.after_swap", final)
        shutil.rmtree(parked)
    faults.fire("publish.after_cleanup", final)
    return result


_EXCHANGE_SUPPORTED: bool | None = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _EXCHANGE_SUPPORTED
    if _EXCHANGE_SUPPORTED is False or os.environ.get("CURATE_NO_RENAME_EXCHANGE"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        _EXCHANGE_SUPPORTED = False
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        _EXCHANGE_SUPPORTED = True
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        _EXCHANGE_SUPPORTED = False
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# --- buckets -------------------------------------------------------------------------------------------
def _publish_bucket(final: str, build: Callable[[str, str], T], owned: Callable[[str], bool]) -> T:
    version = f"v-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    where = io.join(final, version)
    pointer = io.join(final, POINTER)
    previous = io.read_json(pointer)["version"] if io.exists(pointer) else None
    result = build(where, where)
    faults.fire("publish.before_swap", final)
    io.write_json(pointer, {"version": version, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    faults.fire("publish.after_swap", final)
    _remove_bucket_versions(final, owned, keep=(version, previous))
    faults.fire("publish.after_cleanup", final)
    return result


def check_replaceable(final: str, owned: Callable[[str], bool]) -> None:
    """PublishError (naming them) when folder `final` holds files `owned` does not recognise:
    publishing would delete them with the old version. Commands call it before their work too."""
    foreign = _foreign_files(final, owned)
    if foreign:
        raise PublishError(
            f"{final} holds {len(foreign)} file(s) curate did not write ({', '.join(foreign[:5])}); "
            "move them out of the folder, then run the command again (nothing was changed)"
        )


def _foreign_files(final: str, owned: Callable[[str], bool]) -> list[str]:
    """Files of the published version of `final` that `owned` does not recognise."""
    current = resolve(final)
    fs, top = io.fs_and_path(current)
    if not fs.exists(top):
        return []
    top = top.rstrip("/")
    out = []
    for p in fs.find(top):
        rel = p[len(top) + 1 :] if p.startswith(top + "/") else p
        if rel == POINTER or _VERSION.match(rel.split("/", 1)[0]) or ".tmp-" in rel:
            continue
        if not owned(rel):
            out.append(rel)
    return sorted(out)


def _remove_bucket_versions(final: str, owned: Callable[[str], bool], keep: tuple[str | None, ...] = ()) -> None:
    """On a bucket: delete the version prefixes of `final` not in `keep` (older ones, or
    unfinished ones a killed writer left) and curate's own files of a version written before
    pointers. Anything else under `final` (a file someone put there) stays."""
    fs, path = io.fs_and_path(final)
    path = path.rstrip("/")
    if not fs.exists(path):
        return
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if _VERSION.match(base) and base not in keep:
            fs.rm(p, recursive=True)
    for p in fs.find(path):
        rel = p[len(path) + 1 :]
        if rel != POINTER and not _VERSION.match(rel.split("/", 1)[0]) and owned(rel):
            fs.rm(p)
