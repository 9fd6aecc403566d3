"""Hostile inputs for the fetch stage, each against real HTTP servers on 127.0.0.0/8.

Layout: the "public" server is on 127.0.0.2 and the tests allow exactly 127.0.0.2/32 (the guard
stays on); canaries on 127.0.0.1 / 127.0.0.3 stand for private targets and must see zero
requests. Addresses outside 127.0.0.0/8 are only ever checked by the policy, never connected to:
the guard refuses them before connect(), and where a name lookup is involved getaddrinfo is
replaced so no DNS query leaves the machine.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from curate.config import FetchConfig
from curate.demo.image_server import ImageServer, Route
from curate.fetching import http as guarded_http
from curate.fetching.policy import AddressPolicy
from curate.fetching.robots import opt_out
from curate.filters.rules import Reason
from curate.schema import FetchStatus
from curate.stages.fetch import fetch_shard

PUBLIC = "127.0.0.2"
BASE = dict(threads=4, timeout_s=5, retries=0, image_size=64, allow_networks=[f"{PUBLIC}/32"])


def cfg(**kw: Any) -> FetchConfig:
    return FetchConfig(**{**BASE, **kw})


def jpeg(size: tuple[int, int] = (40, 30), color: Any = (255, 0, 0), mode: str = "RGB", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", **save)
    return buf.getvalue()


def png(size: tuple[int, int] = (40, 30), color: Any = (0, 255, 0), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def public() -> Iterator[ImageServer]:
    with ImageServer(PUBLIC) as srv:
        yield srv


@pytest.fixture()
def canary() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as srv:
        srv.add("/secret", jpeg())
        yield srv


@pytest.fixture()
def canary3() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.3") as srv:
        srv.add("/secret", jpeg())
        yield srv


def fetch(urls: list[str], c: FetchConfig | None = None, tmp: str = "/tmp", **extra: list[Any]) -> list[dict[str, Any]]:
    rows = pa.table({"row": list(range(len(urls))), "url": pa.array(urls, pa.string()), **extra})
    status, images = fetch_shard(rows, c or cfg(), tmp, "hostile")
    out = status.to_pylist()
    assert [r["row"] for r in out] == list(range(len(urls)))  # exactly one status per row
    imgs = dict(zip(images["row"].to_pylist(), images["jpg"].to_pylist()))
    for r in out:
        r["jpg"] = imgs.get(r["row"])
        assert (r["jpg"] is not None) == (r["fetch_status"] == "ok")
    return out


def statuses(recs: list[dict[str, Any]]) -> list[str]:
    return [r["fetch_status"] for r in recs]


# --- 1. SSRF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254", "224.0.0.1", "239.255.255.250",
     "0.0.0.0", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     "64:ff9b::a00:1", "2002:a00:1::", "198.18.0.1", "192.0.2.1", "240.0.0.1"],
)  # fmt: skip
def test_policy_refuses_non_public_addresses(ip: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_policy_allows_public_addresses(ip: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(ip)) is None


def test_allow_list_opens_only_the_listed_networks() -> None:
    p = AddressPolicy(["127.0.0.2/32"])
    assert p.refusal(ipaddress.ip_address("127.0.0.2")) is None
    assert p.refusal(ipaddress.ip_address("::ffff:127.0.0.2")) is None  # the same address, v4-mapped
    assert p.refusal(ipaddress.ip_address("127.0.0.3")) is not None
    assert p.refusal(ipaddress.ip_address("169.254.169.254")) is not None
    with pytest.raises(ValueError):
        FetchConfig(allow_networks=["not-a-cidr"])


def test_loopback_is_refused_by_default_and_the_canary_sees_nothing(canary: ImageServer, tmp_path: Any) -> None:
    recs = fetch([canary.url("/secret")], FetchConfig(retries=0), str(tmp_path))
    assert statuses(recs) == ["blocked_address"] and "loopback" in recs[0]["fetch_error"]
    assert canary.hits == {}


@pytest.mark.parametrize(
    "template",
    ["http://2130706433:{port}/secret", "http://0x7f.1:{port}/secret", "http://127.1:{port}/secret", "http://0177.0.0.1:{port}/secret",
     "http://[::ffff:127.0.0.1]:{port}/secret", "http://[::ffff:7f00:1]:{port}/secret", "http://localhost:{port}/secret",
     "HTTP://127.0.0.1:{port}/secret", "http://user:pw@127.0.0.1:{port}/secret"],
)  # fmt: skip
def test_disguised_loopback_forms_are_refused(
    template: str, canary: ImageServer, public: ImageServer, tmp_path: Any
) -> None:
    recs = fetch([template.format(port=canary.port)], tmp=str(tmp_path))
    assert statuses(recs) == ["blocked_address"], recs
    assert canary.hits == {}


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_public_redirect_to_private_is_refused_at_the_hop(
    code: int, public: ImageServer, canary3: ImageServer, tmp_path: Any
) -> None:
    public.redirect("/r", canary3.url("/secret"), status=code)
    recs = fetch([public.url("/r")], tmp=str(tmp_path))
    assert statuses(recs) == ["blocked_address"] and "127.0.0.3" in recs[0]["fetch_error"]
    assert public.hits == {"/r": 1} and canary3.hits == {}


def test_metadata_names_and_addresses_are_refused_before_any_lookup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def no_dns(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"DNS lookup attempted: {a}")

    monkeypatch.setattr(guarded_http.socket, "getaddrinfo", no_dns)
    recs = fetch(
        [
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.GOOGLE.INTERNAL./x",
            "http://instance-data/latest",
        ],
        tmp=str(tmp_path),
    )
    assert statuses(recs) == ["blocked_address"] * 3


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """getaddrinfo for the names in `answers`: the n-th lookup of a name gets answers[name][n]
    (the last repeats). Other names resolve normally (only numeric loopback is used)."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def lookup(host: str, port: Any, *a: Any, **k: Any) -> Any:
        if host in answers:
            n = calls.count(host)
            calls.append(host)
            ips = answers[host][min(n, len(answers[host]) - 1)]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real(host, port, *a, **k)

    monkeypatch.setattr(guarded_http.socket, "getaddrinfo", lookup)
    return calls


def test_dns_rebinding_is_decided_on_the_address_connected_to(
    monkeypatch: pytest.MonkeyPatch, public: ImageServer, canary3: ImageServer, tmp_path: Any
) -> None:
    public.add("/img", jpeg())
    canary3.add("/img", jpeg())
    # rebind.test first resolves to the allowed server, then (on the redirect's lookup) to the canary
    calls = fake_dns(monkeypatch, {"rebind.test": [[PUBLIC], ["127.0.0.3"]], "mixed.test": [[PUBLIC, "127.0.0.3"]]})
    public.redirect("/hop", f"http://rebind.test:{canary3.port}/img")
    # the canary listens on canary3.port; the allowed server on public.port
    recs = fetch([f"http://rebind.test:{public.port}/hop", f"http://mixed.test:{canary3.port}/img"], tmp=str(tmp_path))
    assert statuses(recs) == ["blocked_address", "blocked_address"], recs
    assert canary3.hits == {}
    assert public.hits == {"/hop": 1}
    assert calls.count("rebind.test") == 2  # resolved once per hop, connected to what was checked


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/hostname",
        "ftp://127.0.0.2/x.jpg",
        "gopher://127.0.0.2/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "//127.0.0.2/x",
        "",
        None,
    ],
)
def test_only_http_and_https(url: Any, tmp_path: Any) -> None:
    assert statuses(fetch([url], tmp=str(tmp_path))) == ["bad_url"]


def test_redirect_to_another_scheme_is_refused(public: ImageServer, tmp_path: Any) -> None:
    public.redirect("/f", "file:///etc/passwd")
    recs = fetch([public.url("/f")], tmp=str(tmp_path))
    assert statuses(recs) == ["bad_url"] and "scheme" in recs[0]["fetch_error"]


# --- 2. bounds --------------------------------------------------------------------------------------
def test_drip_feed_stream_frees_the_worker_at_the_deadline(public: ImageServer, tmp_path: Any) -> None:
    public.add("/drip.jpg", jpeg() * 10, drip_s=0.5)  # a byte every half second: no socket timeout ever fires
    public.add("/slow-headers.jpg", jpeg(), delay_s=30)
    t0 = time.monotonic()
    recs = fetch(
        [public.url("/drip.jpg"), public.url("/slow-headers.jpg")], cfg(deadline_s=2, timeout_s=10), str(tmp_path)
    )
    took = time.monotonic() - t0
    assert statuses(recs) == ["timeout", "timeout"], recs
    assert took < 2 + 1, took
    assert "deadline" in recs[0]["fetch_error"]


def test_endless_stream_stops_at_the_byte_cap(public: ImageServer, tmp_path: Any) -> None:
    public.add("/endless.jpg", jpeg(), endless=True)
    t0 = time.monotonic()
    recs = fetch([public.url("/endless.jpg")], cfg(max_bytes=2 << 20, deadline_s=20), str(tmp_path))
    assert statuses(recs) == ["too_large"] and time.monotonic() - t0 < 5


def test_endless_stream_with_a_large_cap_stops_at_the_deadline(public: ImageServer, tmp_path: Any) -> None:
    public.add("/endless.jpg", jpeg(), endless=True)
    t0 = time.monotonic()
    recs = fetch([public.url("/endless.jpg")], cfg(max_bytes=1 << 40, deadline_s=1.5), str(tmp_path))
    assert statuses(recs) == ["timeout"] and time.monotonic() - t0 < 1.5 + 1


def test_content_length_over_the_cap_is_refused_before_reading(public: ImageServer, tmp_path: Any) -> None:
    public.add("/big.jpg", jpeg() + b"\0" * (3 << 20))
    recs = fetch([public.url("/big.jpg")], cfg(max_bytes=1 << 20), str(tmp_path))
    assert statuses(recs) == ["too_large"] and "Content-Length" in recs[0]["fetch_error"]


def test_redirect_cap(public: ImageServer, tmp_path: Any) -> None:
    public.add("/end.jpg", jpeg())
    for i in range(6):
        public.redirect(f"/r{i}", f"/r{i + 1}" if i < 5 else "/end.jpg")  # r0 -> ... -> r5 -> end: 6 hops
    public.redirect("/loop", "/loop")
    recs = fetch([public.url("/r1"), public.url("/r0"), public.url("/loop")], cfg(max_redirects=5), str(tmp_path))
    assert statuses(recs) == ["ok", "too_many_redirects", "too_many_redirects"]


# --- 3. images --------------------------------------------------------------------------------------
def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries one row of data: decoding it would be
    a bomb (and would fail); only the header may be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _oriented_jpeg() -> bytes:
    im = Image.new("RGB", (60, 30), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 30))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(__import__("numpy").full((30, 40), 65535, dtype="uint16")).save(buf, "PNG")
    assert buf.getvalue()[24] == 16
    return buf.getvalue()


def _palette_transparent() -> bytes:
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def centre(jpg: bytes, where: str = "centre") -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpg)) as im:
        rgb = im.convert("RGB")
        x, y = rgb.width // 2, {"centre": rgb.height // 2, "top": rgb.height // 5, "bottom": rgb.height * 4 // 5}[where]
        return rgb.getpixel((x, y))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 24) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_images_formats_bombs_frames_truncation_orientation_modes(public: ImageServer, tmp_path: Any) -> None:
    good = jpeg((80, 60))
    served = {
        "/html-as-jpeg.jpg": (b"<!DOCTYPE html><html><body>login</body></html>", "bad_format"),
        "/svg-as-jpeg.jpg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "bad_format"),
        "/xml-svg.jpg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "bad_format"),
        "/empty.jpg": (b"", "bad_format"),
        "/bomb.png": (_png_with_header(50_000, 50_000), "too_many_pixels"),
        "/truncated.jpg": (good[: len(good) // 2], "decode_error"),
        "/truncated.png": (png((80, 60))[:60], "decode_error"),
        "/corrupt-after-magic.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3, "decode_error"),
        "/animated.gif": (_animated_gif(), "ok"),
        "/oriented.jpg": (_oriented_jpeg(), "ok"),
        "/cmyk.jpg": (jpeg((40, 40), (0, 255, 255, 0), mode="CMYK"), "ok"),
        "/png16.png": (_png16(), "ok"),
        "/transparent.png": (png((40, 40), (0, 0, 255, 0), mode="RGBA"), "ok"),
        "/palette-transparent.png": (_palette_transparent(), "ok"),
        "/bomb-small.png": (_png_with_header(5_000, 5_000), "too_many_pixels"),  # under Pillow's own limit
    }
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 255, 0)).save(buf, "WEBP")
    served["/webp.webp"] = (buf.getvalue(), "ok")
    for path, (body, _) in served.items():
        public.add(path, body, content_type="image/jpeg")
    paths = list(served)
    recs = dict(zip(paths, fetch([public.url(p) for p in paths], cfg(max_pixels=10_000_000), str(tmp_path))))
    assert {p: r["fetch_status"] for p, r in recs.items()} == {p: want for p, (_, want) in served.items()}
    assert "HTML" in recs["/html-as-jpeg.jpg"]["fetch_error"] and "SVG" in recs["/svg-as-jpeg.jpg"]["fetch_error"]
    assert "header" in recs["/bomb.png"]["fetch_error"] and "header" in recs["/bomb-small.png"]["fetch_error"]
    assert close(centre(recs["/animated.gif"]["jpg"]), (255, 0, 0))  # first frame
    o = recs["/oriented.jpg"]
    assert (o["original_width"], o["original_height"]) == (30, 60)
    assert close(centre(o["jpg"], "top"), (255, 0, 0)) and close(centre(o["jpg"], "bottom"), (0, 0, 255))
    assert close(centre(recs["/cmyk.jpg"]["jpg"]), (255, 0, 0), tol=40)
    assert close(centre(recs["/png16.png"]["jpg"]), (255, 255, 255))
    assert close(centre(recs["/transparent.png"]["jpg"]), (255, 255, 255))
    assert close(centre(recs["/palette-transparent.png"]["jpg"]), (255, 255, 255))
    assert close(centre(recs["/webp.webp"]["jpg"]), (0, 255, 0))
    for p in ("/oriented.jpg", "/cmyk.jpg", "/png16.png"):
        assert recs[p]["image_sha256"] == hashlib.sha256(served[p][0]).hexdigest()  # hash of the bytes as served


def test_format_allow_list_is_configurable(public: ImageServer, tmp_path: Any) -> None:
    public.add("/a.gif", _animated_gif())
    assert statuses(fetch([public.url("/a.gif")], cfg(image_formats=["jpeg", "png"]), str(tmp_path))) == ["bad_format"]


# --- 4. opt-outs ------------------------------------------------------------------------------------
D = ["noai", "noimageai", "noindex", "noimageindex"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["otherbot: noai"], None),
        (["otherbot: noai, noimageai"], None),  # a token covers the directives after it in that header
        (["otherbot: noai", "noimageai"], "noimageai"),  # several headers: each counts
        (["otherbot: noai", "curate: noimageai"], "noimageai"),
        (["otherbot: noai, curate: noai"], "noai"),
        (["CURATE: NOAI"], "noai"),
        (["curate : noai"], "noai"),
        (["curatebot: noai"], None),  # tokens match exactly
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),  # a directive's value is not a token
        (["max-image-preview: none, nofollow"], None),
        (["none"], "noindex"),
        (["noai; nofollow"], "noai"),
        (["nofollow, noarchive"], None),
        (["", " , ,"], None),
        (["otherbot:"], None),
    ],
)
def test_x_robots_tag_parser(values: list[str], expected: str | None) -> None:
    assert opt_out(values, "curate", D) == expected


def test_opt_outs_are_honoured_on_every_response_before_the_body(public: ImageServer, tmp_path: Any) -> None:
    body = jpeg()
    public.add("/several.jpg", body, headers={"X-Robots-Tag": ["otherbot: noai", "curate: noimageai"]})
    public.add("/other.jpg", body, headers={"x-robots-tag": "otherbot: noai, noimageai"})
    public.add("/lower.jpg", body, headers={"x-robots-tag": "NOAI"})
    public.add("/target.jpg", body)
    public.add("/redirect", b"", status=302, headers={"Location": "/target.jpg", "X-Robots-Tag": "noimageai"})
    recs = fetch([public.url(p) for p in ("/several.jpg", "/other.jpg", "/lower.jpg", "/redirect")], tmp=str(tmp_path))
    assert statuses(recs) == ["opt_out", "ok", "opt_out", "opt_out"]
    assert public.hits["/target.jpg"] == 0  # the opt-out on the redirect stops the chain


def test_opt_out_is_its_own_reason_and_every_other_failure_is_fetch_failed() -> None:
    from curate.filters.rules import FETCH_FAILURES, fetch_fails, opt_out_fails
    from curate.filters.rules import RULE_ORDER

    assert RULE_ORDER.index(Reason.OPT_OUT) == RULE_ORDER.index(Reason.FETCH_FAILED) + 1
    for s in FetchStatus:
        frame = pl.DataFrame({"fetch_status": [s.value]})
        failed, opted = frame.select(fetch_fails().alias("f"), opt_out_fails().alias("o")).row(0)
        assert opted == (s is FetchStatus.OPT_OUT)
        assert failed == (
            s not in (FetchStatus.OK, FetchStatus.OPT_OUT, FetchStatus.NOT_ATTEMPTED, FetchStatus.NOT_NEEDED)
        )
    assert "timeout" in FETCH_FAILURES and "blocked_address" in FETCH_FAILURES


# --- 5. politeness ----------------------------------------------------------------------------------
def test_429_with_retry_after_is_waited_out_then_retried(public: ImageServer, tmp_path: Any) -> None:
    body = jpeg()
    public.add_sequence("/busy.jpg", [Route(b"slow down", "text/plain", 429, {"Retry-After": "1"}), Route(body)])
    public.add_sequence("/flaky.jpg", [Route(b"", "text/plain", 503), Route(b"", "text/plain", 500), Route(body)])
    t0 = time.monotonic()
    recs = fetch(
        [public.url("/busy.jpg"), public.url("/flaky.jpg")], cfg(retries=2, retry_backoff_s=0.05), str(tmp_path)
    )
    assert statuses(recs) == ["ok", "ok"]
    assert public.hits == {"/busy.jpg": 2, "/flaky.jpg": 3}
    assert time.monotonic() - t0 >= 1.0


def test_permanent_failures_are_not_retried_and_long_retry_after_gives_up(public: ImageServer, tmp_path: Any) -> None:
    public.add("/gone.jpg", b"", status=410)
    public.add("/html.jpg", b"<html></html>")
    public.add("/later.jpg", b"", status=429, headers={"Retry-After": "3600"})
    t0 = time.monotonic()
    recs = fetch(
        [public.url(p) for p in ("/gone.jpg", "/missing.jpg", "/html.jpg", "/later.jpg")], cfg(retries=3), str(tmp_path)
    )
    assert statuses(recs) == ["http_4xx", "http_4xx", "bad_format", "rate_limited"]
    assert public.hits == {"/gone.jpg": 1, "/missing.jpg": 1, "/html.jpg": 1, "/later.jpg": 1}
    assert time.monotonic() - t0 < 3


def test_retries_stop_at_the_retry_count(public: ImageServer, tmp_path: Any) -> None:
    public.add("/down.jpg", b"", status=500)
    recs = fetch([public.url("/down.jpg")], cfg(retries=2, retry_backoff_s=0.01), str(tmp_path))
    assert statuses(recs) == ["http_5xx"] and public.hits == {"/down.jpg": 3}


def test_per_domain_concurrency_limit(public: ImageServer, tmp_path: Any) -> None:
    for i in range(10):
        public.add(f"/{i}.jpg", jpeg(), delay_s=0.2)
    recs = fetch([public.url(f"/{i}.jpg") for i in range(10)], cfg(threads=8, per_domain_concurrency=2), str(tmp_path))
    assert statuses(recs) == ["ok"] * 10
    assert public.max_in_flight <= 2


# --- 7. integrity -----------------------------------------------------------------------------------
def test_sha256_column_detects_swapped_content(public: ImageServer, tmp_path: Any) -> None:
    original, swapped = jpeg(color=(255, 0, 0)), jpeg(color=(0, 0, 255))
    public.add("/kept.jpg", original)
    public.add("/expired-domain.jpg", swapped)
    want = hashlib.sha256(original).hexdigest()
    recs = fetch(
        [public.url("/kept.jpg"), public.url("/expired-domain.jpg"), public.url("/kept.jpg")],
        tmp=str(tmp_path),
        sha256=[want.upper(), want, None],
    )
    assert statuses(recs) == ["ok", "hash_mismatch", "ok"]
    assert recs[1]["image_sha256"] is None and want in recs[1]["fetch_error"]
