"""Image checks between download and img2dataset's Resizer (which decodes with OpenCV).

prepare(body, formats, max_pixels) -> bytes for the Resizer, or raises FetchFailure:

1. magic bytes must name an allow-listed format (HTML/SVG/anything served as image/jpeg is
   bad_format; the Content-Type header is never trusted);
2. Pillow reads the *header only* (restricted to that one format's plugin): width x height above
   `max_pixels` is too_many_pixels before a single pixel is decoded (decompression bombs);
3. the fast path: a plain JPEG/8-bit PNG (RGB, grey or RGBA), upright (EXIF orientation 1), not
   animated, structurally complete (JPEG ends in an EOI marker, PNG in IEND) goes to the Resizer
   as served -- OpenCV decodes it, exactly as img2dataset would;
4. anything else is decoded fully by Pillow (truncation raises: decode_error), first frame only,
   EXIF orientation applied, CMYK/YCbCr/16-bit/palette/alpha converted to 8-bit RGB or grey
   (alpha composited on white, as img2dataset's Resizer does), and handed over as an uncompressed
   PPM/PGM, which OpenCV decodes without loss.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from curate.fetching.http import FetchFailure
from curate.schema import FetchStatus

_PIL_NAME = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
_ORIENTATION = 0x0112


def sniff(body: bytes) -> Optional[str]:
    head = body[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _describe(body: bytes) -> str:
    head = body[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in body[:1024].lower()):
        return "SVG"
    if not body:
        return "an empty body"
    return f"unknown bytes {body[:8]!r}"


def _complete(fmt: str, body: bytes) -> bool:
    tail = body[-32:].rstrip(b"\x00\r\n ")
    if fmt == "jpeg":
        return tail.endswith(b"\xff\xd9")
    if fmt == "png":
        return b"IEND" in tail
    return False


def prepare(body: bytes, formats: list[str], max_pixels: int) -> bytes:
    fmt = sniff(body)
    if fmt is None or fmt not in formats:
        what = _describe(body) if fmt is None else f"{fmt} (not in fetch.image_formats)"
        raise FetchFailure(FetchStatus.BAD_FORMAT, f"not an allowed image format: {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(body), formats=[_PIL_NAME[fmt]])
    except Image.DecompressionBombError as err:
        raise FetchFailure(
            FetchStatus.TOO_MANY_PIXELS, f"decompression bomb (from the header, not decoded): {err}"
        ) from err
    except Exception as err:  # noqa: BLE001 (Pillow raises many kinds on bad headers)
        raise FetchFailure(FetchStatus.DECODE_ERROR, f"image decoding error: unreadable {fmt} header: {err}") from err
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise FetchFailure(FetchStatus.DECODE_ERROR, f"image decoding error: {fmt} header says {w}x{h}")
        if w * h > max_pixels:
            raise FetchFailure(
                FetchStatus.TOO_MANY_PIXELS,
                f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels} (from the header, not decoded)",
            )
        try:
            orientation = im.getexif().get(_ORIENTATION, 1) if fmt in ("jpeg", "png", "webp", "tiff") else 1
        except Exception:  # noqa: BLE001 (a broken EXIF block is not a broken image)
            orientation = 1
        animated = bool(getattr(im, "is_animated", False))
        sixteen_bit = fmt == "png" and len(body) > 24 and body[24] == 16
        fast = (
            fmt in ("jpeg", "png")
            and im.mode in ("RGB", "L", "RGBA")
            and orientation in (1, None)
            and not animated
            and not sixteen_bit
            and _complete(fmt, body)
        )
        if fast:
            return body
        try:
            im.seek(0)
            im.load()
            out = _normalised(im)
        except FetchFailure:
            raise
        except Exception as err:  # noqa: BLE001 (truncated, corrupt)
            raise FetchFailure(
                FetchStatus.DECODE_ERROR, f"image decoding error: {fmt} is truncated or corrupt: {err}"
            ) from err
    buf = io.BytesIO()
    out.save(buf, "PPM")
    return buf.getvalue()


def _normalised(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if mode == "1":
        return im.convert("L")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P
