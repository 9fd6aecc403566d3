"""fetch_shard against a real HTTP server on 127.0.0.1 (img2dataset's Resizer stores the images).

Hostile inputs (SSRF, bounds, formats, opt-outs, politeness, integrity): tests/test_fetch_hostile.py."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pytest
from PIL import Image

from curate.config import FetchConfig
from curate.demo.image_server import ImageServer
from curate.schema import FetchStatus
from curate.stages.fetch import IMAGES_SCHEMA, STATUS_SCHEMA, FetchError, fetch_shard, reconcile

IMAGE_SIZE = 64
# the test server is on loopback: allowed explicitly, the SSRF guard stays on
CFG = FetchConfig(threads=4, timeout_s=5, retries=0, image_size=IMAGE_SIZE, allow_networks=["127.0.0.0/8"])


def encode(fmt: str, size: tuple[int, int], color: Any, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    path: Optional[str]  # on the test server; None for a URL given outright
    status: FetchStatus
    error: Optional[str] = None  # substring of fetch_error
    body: bytes = b""
    size: Optional[tuple[int, int]] = None  # as served
    stored: Optional[tuple[int, int]] = None  # after keep-ratio downscaling to IMAGE_SIZE
    rgb: Optional[tuple[int, int, int]] = None
    url: Optional[str] = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


def serve_cases(srv: ImageServer) -> list[Case]:
    ok = FetchStatus.OK
    jpeg_red = encode("JPEG", (64, 48), (255, 0, 0))
    png_green = encode("PNG", (100, 40), (0, 255, 0))
    jpeg_blue = encode("JPEG", (320, 128), (0, 0, 255))
    png_rgba = encode("PNG", (200, 100), (255, 255, 0, 255), mode="RGBA")
    png_grey = encode("PNG", (50, 70), 128, mode="L")
    cases = [
        Case("/red.jpg", ok, body=jpeg_red, size=(64, 48), stored=(64, 48), rgb=(255, 0, 0)),
        Case("/green.png", ok, body=png_green, size=(100, 40), stored=(100, 40), rgb=(0, 255, 0)),
        Case("/blue.jpg", ok, body=jpeg_blue, size=(320, 128), stored=(160, 64), rgb=(0, 0, 255)),
        Case("/yellow-rgba.png", ok, body=png_rgba, size=(200, 100), stored=(128, 64), rgb=(255, 255, 0)),
        Case("/grey.png", ok, body=png_grey, size=(50, 70), stored=(50, 70), rgb=(128, 128, 128)),
        # a directive for another crawler's token does not apply to ours
        Case("/other-bot.jpg", ok, body=jpeg_red, size=(64, 48), stored=(64, 48), rgb=(255, 0, 0)),
        Case("/missing.jpg", FetchStatus.HTTP_4XX, "404"),
        Case("/error.jpg", FetchStatus.HTTP_5XX, "500"),
        Case("/corrupt.jpg", FetchStatus.BAD_FORMAT, "format", body=bytes(random.Random(1).randbytes(2000))),
        Case("/page.jpg", FetchStatus.BAD_FORMAT, "HTML", body=b"<!doctype html><html><body>hi</body></html>"),
        Case("/noai.jpg", FetchStatus.OPT_OUT, "X-Robots-Tag", body=jpeg_red),
        Case("/our-bot.jpg", FetchStatus.OPT_OUT, "X-Robots-Tag", body=jpeg_red),
        Case(None, FetchStatus.CONNECTION_ERROR, "refused", url=f"http://127.0.0.1:{free_port()}/nobody-listens.jpg"),
        Case(None, FetchStatus.BAD_URL, "scheme", url="file:///etc/hostname"),
        Case(None, FetchStatus.BAD_URL, "no URL", url=None),
    ]
    for c in cases:
        if c.path is None or c.path == "/missing.jpg":
            continue
        content_type = "image/png" if c.path.endswith(".png") else "image/jpeg"
        status = 500 if c.path == "/error.jpg" else 200
        headers = {
            "/noai.jpg": {"X-Robots-Tag": "noai"},
            "/other-bot.jpg": {"X-Robots-Tag": "otherbot: noai, noimageai"},
            "/our-bot.jpg": {"X-Robots-Tag": "curate: noimageai"},
        }.get(c.path)
        srv.add(c.path, c.body, content_type=content_type, status=status, headers=headers)
    return cases


def shuffled_rows(srv: ImageServer, cases: list[Case], seed: int = 0) -> tuple[pa.Table, dict[int, Case]]:
    """Non-contiguous row ids, in shuffled order: a join by position would mismatch them."""
    rng = random.Random(seed)
    ids = rng.sample(range(1000), len(cases))
    by_row = dict(zip(ids, cases))
    order = list(by_row)
    rng.shuffle(order)
    urls = [by_row[r].url if by_row[r].path is None else srv.url(by_row[r].path) for r in order]
    table = pa.table(
        {"row": pa.array(order, pa.int64()), "url": pa.array(urls, pa.string()), "caption": [f"c{r}" for r in order]}
    )
    return table, by_row


def assert_close(pixel: tuple[int, ...], rgb: tuple[int, int, int], tol: int = 10) -> None:
    assert all(abs(a - b) <= tol for a, b in zip(pixel, rgb)), (pixel, rgb)


def test_mixed_shard_every_row_once_joined_by_row(server: ImageServer, tmp_path: Any) -> None:
    cases = serve_cases(server)
    rows, by_row = shuffled_rows(server, cases)

    status, images = fetch_shard(rows, CFG, str(tmp_path), "part-00007")

    assert status.schema == STATUS_SCHEMA and images.schema == IMAGES_SCHEMA
    assert status["row"].to_pylist() == sorted(by_row)  # exactly once each, sorted
    got = {r["row"]: r for r in status.to_pylist()}
    for row, case in by_row.items():
        rec = got[row]
        assert rec["fetch_status"] == case.status.value, (case, rec)
        if case.status is FetchStatus.OK:
            assert rec["fetch_error"] is None
            assert (rec["original_width"], rec["original_height"]) == case.size
            assert (rec["width"], rec["height"]) == case.stored
            assert rec["image_sha256"] == hashlib.sha256(case.body).hexdigest()
        else:
            assert case.error and case.error.lower() in (rec["fetch_error"] or "").lower(), (case, rec)
            assert [rec[k] for k in ("width", "height", "original_width", "original_height", "image_sha256")] == [
                None
            ] * 5

    ok_rows = sorted(r for r, c in by_row.items() if c.status is FetchStatus.OK)
    assert images["row"].to_pylist() == ok_rows
    for row, jpg in zip(images["row"].to_pylist(), images["jpg"].to_pylist()):
        case = by_row[row]
        with Image.open(io.BytesIO(jpg)) as im:
            assert im.format == "JPEG"
            assert im.size == case.stored
            assert case.rgb is not None
            assert_close(im.convert("RGB").getpixel((im.width // 2, im.height // 2)), case.rgb)

    served = [c.path for c in cases if c.path is not None]
    assert server.hits == Counter({p: 1 for p in served})  # nothing else, no retries, no file:// read
    assert os.listdir(tmp_path) == []  # temp dir removed


def test_empty_shard(tmp_path: Any) -> None:
    rows = pa.table(
        {"row": pa.array([], pa.int64()), "url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}
    )
    status, images = fetch_shard(rows, CFG, str(tmp_path), "empty")
    assert status.num_rows == 0 and images.num_rows == 0
    assert status.schema == STATUS_SCHEMA and images.schema == IMAGES_SCHEMA


def test_duplicate_row_ids_are_rejected(tmp_path: Any) -> None:
    rows = pa.table({"row": [1, 1], "url": ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"], "caption": ["a", "b"]})
    with pytest.raises(ValueError, match="duplicate"):
        fetch_shard(rows, CFG, str(tmp_path), "dups")


def test_one_rows_surprise_is_that_rows_status(
    server: ImageServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception for one URL becomes internal_error for that row (traceback in
    fetch_error); the other rows are unaffected."""
    from curate.fetching import images as image_checks

    real = image_checks.prepare

    def exploding(body: bytes, *a: Any) -> bytes:
        if body.startswith(b"\xff\xd8") and len(body) == len(boom):
            raise RuntimeError("boom")
        return real(body, *a)

    monkeypatch.setattr(image_checks, "prepare", exploding)
    fine = encode("PNG", (40, 40), (255, 0, 0))
    boom = encode("JPEG", (41, 41), (255, 0, 0))
    server.add("/fine.png", fine)
    server.add("/explode.jpg", boom)
    rows = pa.table(
        {
            "row": [10, 20, 30],
            "url": [server.url("/fine.png"), server.url("/explode.jpg"), server.url("/gone.jpg")],
            "caption": ["a", "b", "c"],
        }
    )

    status, images = fetch_shard(rows, CFG, str(tmp_path), "part-lost")

    got = {r["row"]: r for r in status.to_pylist()}
    assert list(got) == [10, 20, 30]
    assert got[10]["fetch_status"] == "ok"
    assert got[20]["fetch_status"] == FetchStatus.INTERNAL_ERROR.value
    assert "RuntimeError: boom" in got[20]["fetch_error"]
    assert got[30]["fetch_status"] == "http_4xx"
    assert images["row"].to_pylist() == [10]
    assert os.listdir(tmp_path) == []


def test_shard_failure_raises_with_shard_name(
    server: ImageServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.stages import fetch

    def broken(cfg: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(fetch, "_make_resizer", broken)
    server.add("/a.jpg", encode("JPEG", (40, 40), (0, 0, 0)))
    rows = pa.table({"row": [0], "url": [server.url("/a.jpg")], "caption": ["a"]})
    with pytest.raises(FetchError, match=r"part-00042.*disk full"):
        fetch_shard(rows, CFG, str(tmp_path), "part-00042")
    assert os.listdir(tmp_path) == []


# --- reconcile (no network) ---------------------------------------------------------------------
def rec(row: int, status: str = "ok", **kw: Any) -> dict[str, Any]:
    base = {"row": row, "fetch_status": status, "fetch_error": None, "width": None, "height": None,
            "original_width": None, "original_height": None, "image_sha256": None}  # fmt: skip
    return {**base, **kw}


def test_reconcile_marks_missing_rows_lost() -> None:
    status, images = reconcile(
        [3, 9, 5], [rec(5, width=8), rec(3, "http_4xx", fetch_error="HTTP Error 404")], [(5, b"\xff\xd8")], "s"
    )
    assert status["row"].to_pylist() == [3, 5, 9]
    assert status["fetch_status"].to_pylist() == ["http_4xx", "ok", "lost"]
    assert "no record" in status["fetch_error"][2].as_py()
    assert images["row"].to_pylist() == [5] and images["jpg"].to_pylist() == [b"\xff\xd8"]


@pytest.mark.parametrize(
    ("records", "imgs", "match"),
    [
        ([rec(1), rec(1)], [(1, b"x")], "two records"),
        ([rec(2)], [(2, b"x")], "not requested"),
        ([rec(1)], [], "disagree"),
    ],
)
def test_reconcile_rejects_broken_output(
    records: list[dict[str, Any]], imgs: list[tuple[int, bytes]], match: str
) -> None:
    with pytest.raises(FetchError, match=match):
        reconcile([1], records, imgs, "s")
