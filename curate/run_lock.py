"""One writer per run directory. `curate run`, `select`, `forget` and `report` hold the run's lock
while they write; a second writer is refused at once with a message naming the holder (its
command, pid, host and start time). Readers (`sweep`, `diff`, reading a selection) take no lock:
what they read is published whole (curate/publish.py).

Local disks: an OS file lock (`flock`) on RUN_DIR/.curate.lock, which also holds the holder's
description. The kernel drops the lock when the holder exits in any way, `kill -9` included, so a
dead writer never blocks the next one. The file itself stays (deleting a lock file races).

Buckets: a lease object RUN_DIR/.curate.lock created with a conditional write (`If-None-Match: *`,
through s3fs's exclusive-create mode), so exactly one of two writers creates it. The holder renews
it every LEASE_S / 3 seconds and deletes it when done. A lease not renewed for LEASE_S (its holder
was killed), or whose holder ran on this host and is gone, may be taken over. Stores without conditional writes fall back to
write-then-read-back, which narrows but cannot close the race: docs/ARCHITECTURE.md states the
single-writer rule for them.

Within one process the lock is re-entrant: the runner holds it and calls the selection writer,
which asks for it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

from curate import io, store
import fcntl

LOCK_NAME = store.LOCK
LEASE_S = 120.0


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


_held: dict[str, "_Holder"] = {}  # run dir -> this process's lock on it
_guard = threading.Lock()


def lock_path(run_dir: str) -> str:
    return io.join(run_dir, LOCK_NAME)


def describe_self(command: str | None = None) -> dict:
    cmd = command or shlex.join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    return {
        "command": cmd,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": uuid.uuid4().hex,
    }


def _busy(run_dir: str, holder: dict | None, extra: str = "") -> RunDirBusy:
    if holder:
        who = (
            f"`{holder.get('command')}` (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
        )
    else:
        who = "another process (it has not written its name yet)"
    return RunDirBusy(f"{run_dir} is in use by {who}; wait for it to finish, or stop it, then run this again{extra}")


@contextlib.contextmanager
def hold(run_dir: str, command: str | None = None) -> Iterator[dict]:
    """Hold RUN_DIR's writer lock for the block (creating RUN_DIR if needed); RunDirBusy when
    another process holds it. Yields this holder's description."""
    key = _key(run_dir)
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            mine.depth += 1
    if mine is not None:
        try:
            yield mine.info
        finally:
            with _guard:
                mine.depth -= 1
        return
    io.makedirs(run_dir)
    holder = (_LocalLock if io.is_local(run_dir) else _Lease)(run_dir, describe_self(command))
    holder.acquire()
    with _guard:
        _held[key] = holder
    try:
        yield holder.info
    finally:
        with _guard:
            _held.pop(key, None)
        holder.release()


def _key(run_dir: str) -> str:
    return os.path.realpath(run_dir) if "://" not in run_dir else run_dir.rstrip("/")


class _Holder:
    def __init__(self, run_dir: str, info: dict) -> None:
        self.run_dir, self.info, self.depth = run_dir, info, 0


class _LocalLock(_Holder):
    fd: int = -1

    def acquire(self) -> None:
        path = lock_path(self.run_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _busy(self.run_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock; the file (and its last holder's name) stays
            self.fd = -1


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


class _Lease(_Holder):
    """A lease object on a bucket, renewed by a daemon thread while held."""

    _stop: threading.Event
    _thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return (json.dumps({**self.info, "expires": time.time() + LEASE_S}) + "\n").encode()

    def acquire(self) -> None:
        path = lock_path(self.run_dir)
        fs, p = io.fs_and_path(path)
        for attempt in range(2):
            try:
                with fs.open(p, "xb") as f:  # conditional create: If-None-Match: *
                    f.write(self._body())
                break
            except FileExistsError:
                holder = _read_lease(fs, p)
                if holder is not None and _alive(holder) or attempt:
                    until = (
                        f" (its lease runs until {time.strftime('%H:%M:%SZ', time.gmtime(holder['expires']))} unless renewed)"
                        if holder
                        else ""
                    )
                    raise _busy(self.run_dir, holder, until) from None
                fs.rm(p)  # expired: its holder died without releasing; take it over (one of us wins the create)
            except (NotImplementedError, ValueError, TypeError):
                if fs.exists(p) and (h := _read_lease(fs, p)) and _alive(h):
                    raise _busy(self.run_dir, h) from None
                with fs.open(p, "wb") as f:  # no conditional writes here: write, then read back
                    f.write(self._body())
                time.sleep(0.5)
                if (h := _read_lease(fs, p)) is None or h.get("token") != self.info["token"]:
                    raise _busy(self.run_dir, h) from None
                break
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="curate-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        fs, p = io.fs_and_path(lock_path(self.run_dir))
        while not self._stop.wait(LEASE_S / 3):
            current = _read_lease(fs, p)
            if current is None or current.get("token") != self.info["token"]:
                return  # taken over (we were presumed dead): never overwrite another holder
            with fs.open(p, "wb") as f:
                f.write(self._body())

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        fs, p = io.fs_and_path(lock_path(self.run_dir))
        current = _read_lease(fs, p)
        if current is not None and current.get("token") == self.info["token"]:
            fs.rm(p)


def _alive(holder: dict) -> bool:
    """A lease counts until it expires, unless its holder ran on this host and is gone (a killed
    command on this machine does not block the next one for LEASE_S)."""
    if holder.get("expires", 0) <= time.time():
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _read_lease(fs, p: str) -> dict | None:
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
