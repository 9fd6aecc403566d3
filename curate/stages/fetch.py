"""Fetch stage: download one shard's images safely and account for every row.

Design (docs/FETCH.md has the long form). img2dataset's Downloader hard-wires
`urllib.request.urlopen` (follows redirects anywhere, reads file://, no byte cap, no total
deadline) and its loop is one closed method, so guarding it would mean monkeypatching a module
global that every thread of the process shares. Instead this module is a fetch loop of our own
with img2dataset's shape -- a ThreadPool downloads (imap_unordered, at most 2 x threads samples in
flight), the consuming thread resizes -- and it uses img2dataset for what it does well: its
Resizer (OpenCV decode, keep-ratio downscale, JPEG encode) turns every valid image into the
stored JPEG exactly as img2dataset would. Around it, ours:

- curate.fetching.http.GuardedFetcher: SSRF guard on the connected IP at every redirect hop,
  byte cap, redirect cap, total per-URL deadline enforced by a watchdog;
- curate.fetching.robots: X-Robots-Tag opt-outs, checked on every response before the body;
- curate.fetching.images: magic-byte allow-list, pixel cap from the header, truncation, EXIF
  orientation, CMYK / 16-bit / alpha / animation normalised before the Resizer sees the bytes;
- politeness: per-host concurrency limit, Retry-After backoff shared by the host's URLs, retries
  of transient failures with full jitter, all inside the URL's deadline;
- integrity: an input `sha256` column is compared with the bytes served (hash_mismatch).

Every input row gets exactly one status (FetchStatus); detail goes to fetch_error. A failure of
the shard as a whole raises FetchError naming the shard (the runner records it and exits non-zero).

A pool already downloaded (input.format = "webdataset") is not fetched: the stage takes each row's
image from the pool's tar and its status from img2dataset's (curate/webdataset_input.py), and
returns the same table a fetch would.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Optional
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema, webdataset_input
from curate.annotations import FIELDS
from curate.urls import host_of as _host
from curate.config import FetchConfig, InputConfig
from curate.stages.base import Stage
from curate.fetching import images as image_checks
from curate.fetching import robots
from curate.fetching.http import FetchFailure, GuardedFetcher
from curate.fetching.policy import AddressPolicy
from curate.schema import (
    FETCH_ERROR,
    FETCH_STATUS,
    HEIGHT,
    IMAGE_BYTES,
    IMAGE_SHA256,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    ROW,
    URL,
    WIDTH,
    FetchStatus,
)
from multiprocessing.pool import ThreadPool

log = logging.getLogger(__name__)

# the annotation columns the fetch fills in, typed as the annotation table types them (one place)
STATUS_SCHEMA = pa.schema(
    [FIELDS[c] for c in (ROW, FETCH_STATUS, FETCH_ERROR, WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT, IMAGE_SHA256)]
)
IMAGES_SCHEMA = pa.schema([pa.field(ROW, pa.int64()), pa.field(IMAGE_BYTES, pa.binary())])

FETCHABLE_SCHEMES = frozenset({"http", "https"})
EXPECTED_SHA256 = schema.EXPECTED_SHA256  # optional input column: hex sha256 of the bytes the URL must serve

# Outcomes worth another attempt (in this run, and by a rerun); everything else is final.
TRANSIENT = frozenset(
    {
        FetchStatus.TIMEOUT,
        FetchStatus.CONNECTION_ERROR,
        FetchStatus.HTTP_5XX,
        FetchStatus.RATE_LIMITED,
        FetchStatus.INTERNAL_ERROR,
        FetchStatus.LOST,
        FetchStatus.DOWNLOAD_FAILED,
    }
)
_SIZE_COLUMNS = (WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT)


class FetchError(RuntimeError):
    """A shard could not be fetched as a whole, or an invariant broke. Names the shard."""


def user_agent(token: str) -> str:
    return f"Mozilla/5.0 (compatible; {token}; +image-text dataset curation; honours X-Robots-Tag noai)"


def fetch_shard(rows: pa.Table, cfg: FetchConfig, work_dir: str, shard: str) -> tuple[pa.Table, pa.Table]:
    """Fetch the images of one shard's rows (columns `row`, `url`, optional `sha256`, ...).

    Returns (status, images): `status` has exactly one row per input row (STATUS_SCHEMA, sorted by
    row); `images` holds the stored JPEG of each ok row (IMAGES_SCHEMA, sorted by row).
    Raises FetchError (naming the shard) when the shard fails as a whole. `work_dir` is unused
    (nothing is written to disk) and kept for the contract.
    """
    rows = _checked_rows(rows, shard)
    try:
        records, images = _ShardFetch(cfg).run(rows)
    except FetchError:
        raise
    except Exception as err:
        raise FetchError(f"shard {shard!r}: fetch failed: {type(err).__name__}: {err}") from err
    return reconcile(rows[ROW].to_pylist(), records, images, shard)


# --- input ----------------------------------------------------------------------------------------
def _checked_rows(rows: pa.Table, shard: str) -> pa.Table:
    missing = {ROW, URL} - set(rows.column_names)
    if missing:
        raise ValueError(f"shard {shard!r}: fetch input lacks column(s) {sorted(missing)}")
    cols = {ROW: rows[ROW].cast(pa.int64()), URL: rows[URL].cast(pa.string())}
    if EXPECTED_SHA256 in rows.column_names:
        cols[EXPECTED_SHA256] = rows[EXPECTED_SHA256].cast(pa.string())
    out = pa.table(cols)
    if out[ROW].null_count:
        raise ValueError(f"shard {shard!r}: fetch input has null `{ROW}` values")
    if len(pc.unique(out[ROW])) != out.num_rows:
        raise ValueError(f"shard {shard!r}: fetch input has duplicate `{ROW}` values")
    return out


def _refusal(url: Optional[str]) -> Optional[str]:
    """Why `url` is not fetched at all, or None when it is."""
    if url is None or not url.strip():
        return "no URL"
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError as err:
        return f"invalid URL: {err}"
    if scheme not in FETCHABLE_SCHEMES:
        return f"refused URL scheme {scheme!r}: only http and https are fetched"
    return None


def _interleaved(items: list[tuple[int, str, Optional[str]]]) -> list[tuple[int, str, Optional[str]]]:
    """Round-robin over hosts, so a shard dominated by one host does not park every thread on it."""
    by_host: OrderedDict[str, list[tuple[int, str, Optional[str]]]] = OrderedDict()
    for item in items:
        by_host.setdefault(_host(item[1]), []).append(item)
    queues = [iter(v) for v in by_host.values()]
    out: list[tuple[int, str, Optional[str]]] = []
    while queues:
        alive = []
        for q in queues:
            nxt = next(q, None)
            if nxt is not None:
                out.append(nxt)
                alive.append(q)
        queues = alive
    return out


# --- politeness -----------------------------------------------------------------------------------
class _Hosts:
    """Per-host concurrency slots and a shared 'not before' time set by Retry-After / backoff."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._not_before: dict[str, float] = {}

    def slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            sem = self._slots.get(host)
            if sem is None:
                sem = self._slots[host] = threading.BoundedSemaphore(self.limit)
            return sem

    def not_before(self, host: str) -> float:
        with self._lock:
            return self._not_before.get(host, 0.0)

    def back_off(self, host: str, until: float) -> None:
        with self._lock:
            self._not_before[host] = max(self._not_before.get(host, 0.0), until)


# --- the fetch loop -------------------------------------------------------------------------------
class _ShardFetch:
    def __init__(self, cfg: FetchConfig) -> None:
        self.cfg = cfg
        self.fetcher = GuardedFetcher(
            AddressPolicy(cfg.allow_networks),
            timeout_s=cfg.timeout_s,
            max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects,
            user_agent=user_agent(cfg.user_agent_token),
        )
        self.hosts = _Hosts(cfg.per_domain_concurrency)
        self.disallowed = [d.strip().lower() for d in cfg.disallowed_header_directives]
        self.token = cfg.user_agent_token.strip().lower()

    def run(self, rows: pa.Table) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]]]:
        urls = rows[URL].to_pylist()
        shas = rows[EXPECTED_SHA256].to_pylist() if EXPECTED_SHA256 in rows.column_names else [None] * rows.num_rows
        records: list[dict[str, Any]] = []
        todo: list[tuple[int, str, Optional[str]]] = []
        for row, url, sha in zip(rows[ROW].to_pylist(), urls, shas):
            why = _refusal(url)
            if why is not None:
                records.append(_record(row, FetchStatus.BAD_URL, why))
            else:
                todo.append((row, url.strip(), sha.strip().lower() if isinstance(sha, str) and sha.strip() else None))
        images: list[tuple[int, bytes]] = []
        if not todo:
            return records, images
        resizer = _make_resizer(self.cfg)
        in_flight = threading.Semaphore(self.cfg.threads * 2)  # bounds bodies waiting for the resizer

        def feed() -> Iterator[tuple[int, str, Optional[str]]]:
            for item in _interleaved(todo):
                in_flight.acquire()
                yield item

        with ThreadPool(self.cfg.threads) as pool:
            for row, got in pool.imap_unordered(self._download, feed()):
                try:
                    if isinstance(got, dict):
                        records.append(got)
                        continue
                    prepared, sha = got
                    del got
                    img, width, height, ow, oh, err = resizer(io.BytesIO(prepared))
                    del prepared
                    if err is not None:
                        records.append(_record(row, FetchStatus.DECODE_ERROR, f"image decoding error: {err}"))
                        continue
                    records.append(_record(row, FetchStatus.OK, None, (width, height, ow, oh), sha))
                    images.append((row, img))
                except Exception as err:  # noqa: BLE001 (one row's surprise is that row's status)
                    records.append(_record(row, FetchStatus.INTERNAL_ERROR, _internal(err)))
                finally:
                    in_flight.release()
        return records, images

    def _download(self, item: tuple[int, str, Optional[str]]) -> tuple[int, Any]:
        """Worker thread: (row, record) for a final failure, or (row, (bytes for the Resizer, sha256))."""
        row, url, expected = item
        try:
            body = self._get_with_retries(url)
            sha = hashlib.sha256(body).hexdigest()
            if expected is not None and sha != expected:
                return row, _record(
                    row, FetchStatus.HASH_MISMATCH, f"sha256 of the bytes served {sha} != input sha256 {expected}"
                )
            prepared = image_checks.prepare(body, self.cfg.image_formats, self.cfg.max_pixels)
            return row, (prepared, sha)
        except FetchFailure as f:
            return row, _record(row, f.status, f.detail)
        except Exception as err:  # noqa: BLE001
            return row, _record(row, FetchStatus.INTERNAL_ERROR, _internal(err))

    def _check_headers(self, status: int, headers: Any) -> None:
        values = headers.get_all("X-Robots-Tag") or []
        if values and self.disallowed:
            hit = robots.opt_out(values, self.token, self.disallowed)
            if hit:
                raise FetchFailure(
                    FetchStatus.OPT_OUT, f"X-Robots-Tag {hit!r} applies to {self.token!r}: {'; '.join(values)[:200]}"
                )

    def _get_with_retries(self, url: str) -> bytes:
        cfg = self.cfg
        host = _host(url)
        slot = self.hosts.slot(host)
        deadline: Optional[float] = None  # starts when the first attempt gets its host slot
        attempt = 0
        while True:
            if deadline is None:
                slot.acquire()
                deadline = time.monotonic() + cfg.deadline_s
            elif not slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise FetchFailure(
                    FetchStatus.TIMEOUT, f"total deadline {cfg.deadline_s:g}s passed waiting for a slot on {host}"
                )
            try:
                wait = self.hosts.not_before(host) - time.monotonic()
                if wait > 0:
                    if time.monotonic() + wait >= deadline:
                        raise FetchFailure(
                            FetchStatus.RATE_LIMITED,
                            f"{host} asked us to back off for {wait:.1f}s more, beyond the deadline",
                        )
                    time.sleep(wait)
                return self.fetcher.get(url, deadline, self._check_headers).body
            except FetchFailure as f:
                if f.retry_after is not None:
                    if f.retry_after > cfg.max_retry_after_s:
                        raise FetchFailure(
                            f.status, f"{f.detail} (Retry-After {f.retry_after:g}s > max_retry_after_s)"
                        ) from f
                    self.hosts.back_off(host, time.monotonic() + f.retry_after)  # every URL of the host waits
                if f.status not in TRANSIENT or attempt >= cfg.retries:
                    raise
                pause = random.uniform(0, cfg.retry_backoff_s * (2**attempt))  # full jitter
                if f.retry_after is not None:
                    pause = max(pause, f.retry_after)
                if time.monotonic() + pause >= deadline:
                    raise
                attempt += 1
            finally:
                slot.release()
            time.sleep(pause)


def _make_resizer(cfg: FetchConfig) -> Any:
    # albumentations (imported by img2dataset's resizer) otherwise asks PyPI for a newer version on
    # import, over the network, and warns about it.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # lazy: img2dataset's resizer (cv2, albumentations) costs ~3.7 s; only a fetch that resizes needs it
    from img2dataset import resizer as i2d_resizer

    # Not thread-safe (it swaps the process's stdout/stderr fds around OpenCV calls): one thread only.
    return i2d_resizer.Resizer(
        image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg"
    )


def _internal(err: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
    return f"internal error: {type(err).__name__}: {err}\n{tb}"[:2000]


def _record(
    row: int,
    status: FetchStatus,
    error: Optional[str],
    sizes: Sequence[Optional[int]] = (None, None, None, None),
    sha256: Optional[str] = None,
) -> dict[str, Any]:
    return {
        ROW: row,
        FETCH_STATUS: status.value,
        FETCH_ERROR: error,
        **dict(zip(_SIZE_COLUMNS, sizes)),
        IMAGE_SHA256: sha256,
    }


# --- reconciliation -------------------------------------------------------------------------------
def reconcile(
    expected_rows: Sequence[int], records: list[dict[str, Any]], images: list[tuple[int, bytes]], shard: str
) -> tuple[pa.Table, pa.Table]:
    """Exactly one status per expected row: a row with no record is `lost` (logged); a duplicate
    record, a record for an unknown row, or an ok row without its image raises FetchError."""
    expected = set(expected_rows)
    by_row: dict[int, dict[str, Any]] = {}
    for rec in records:
        row = rec[ROW]
        if row not in expected:
            raise FetchError(f"shard {shard!r}: fetch produced a record for row {row}, which was not requested")
        if row in by_row:
            raise FetchError(f"shard {shard!r}: fetch produced two records for row {row}")
        by_row[row] = rec
    lost = [r for r in expected_rows if r not in by_row]
    for row in lost:
        by_row[row] = _record(row, FetchStatus.LOST, "the fetch loop returned no record for this row")
    if lost:
        log.warning("shard %r: no fetch record for %d row(s), marked lost: %s", shard, len(lost), lost[:20])
    image_rows = [r for r, _ in images]
    ok_rows = sorted(r for r, rec in by_row.items() if rec[FETCH_STATUS] == FetchStatus.OK.value)
    if sorted(image_rows) != ok_rows:
        raise FetchError(f"shard {shard!r}: ok rows and stored images disagree")
    status = pa.Table.from_pylist([by_row[r] for r in sorted(by_row)], schema=STATUS_SCHEMA)
    imgs = pa.table(
        {ROW: pa.array(image_rows, pa.int64()), IMAGE_BYTES: pa.array([b for _, b in images], pa.binary())},
        schema=IMAGES_SCHEMA,
    )
    return status, imgs.sort_by(ROW).combine_chunks()


def pool_shard(rows: pa.Table, cfg: InputConfig, shard: str) -> tuple[pa.Table, pa.Table]:
    """fetch_shard's result for rows of a pool already downloaded (input.format = "webdataset"):
    images from its tar, statuses from img2dataset's. No network. Raises FetchError naming the
    shard and the pool file when the tar or its parquet cannot be read."""
    rows = _checked_rows(rows, shard)
    try:
        records, images = webdataset_input.pool_images(rows, cfg, shard)
    except webdataset_input.PoolError as err:
        raise FetchError(f"shard {shard!r}: {err}") from err
    return reconcile(rows[ROW].to_pylist(), records, images, shard)


def fetch(rows: pa.Table, cfg: FetchConfig, input_cfg: InputConfig, *, shard: str) -> pa.Table:
    """The fetch stage: one row per input row (STATUS_SCHEMA columns, sorted by row) plus `jpg`,
    the stored image of each ok row (null for the others). A webdataset pool's rows are taken from
    its tars instead (pool_shard)."""
    if input_cfg.format == "webdataset":
        status, images = pool_shard(rows, input_cfg, shard)
    else:
        status, images = fetch_shard(rows, cfg, "", shard)
    return status.join(images, keys=ROW, join_type="left outer").sort_by(ROW).combine_chunks()


# I/O bound: one worker's sockets are fetch.threads threads, not CPUs; resizing is the CPU part.
# `input` says where the images are: the network, or the tars of a pool already downloaded
FETCH = Stage("fetch", ("fetch", "input"), fetch, cpus=1)
