"""Synthetic demo dataset: URL-caption shards in LAION layout, the images they point at, and the
ground truth a test can hold the pipeline to.

Rows come from four "sites", each a real HTTP server on its own loopback address (127.0.0.1-4),
so the report has several domains. About a third of the captions describe something else
(mismatched), captions are in six languages (Italian is not in the demo's allow-list), and the
data holds URL duplicates, byte-identical image duplicates, re-encoded near duplicates, 404s,
corrupt images and images too small to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from curate.demo import synthetic
from io import BytesIO
from PIL import Image

SITES: tuple[tuple[str, str], ...] = (
    ("127.0.0.1", "shop-a"),
    ("127.0.0.2", "news-b"),
    ("127.0.0.3", "blog-c"),
    ("127.0.0.4", "stock-d"),
)
SITE_WEIGHTS = (0.4, 0.25, 0.2, 0.15)
LANGUAGE_WEIGHTS = {"en": 0.45, "de": 0.15, "fr": 0.12, "es": 0.1, "pl": 0.1, "it": 0.08}
DEMO_ALLOWED_LANGUAGES = ("en", "de", "fr", "es", "pl")  # must match pipelines/demo.toml
MISMATCH_RATE = 1 / 3
DEMO_MIN_SIDE = 32  # must match pipelines/demo.toml

# copies of an earlier unique row: same URL spelled differently, same bytes, re-encoded JPEG
DUPLICATE_KINDS = ("url_duplicate", "image_duplicate", "near_duplicate")

# row kinds and their shares; the rest are "unique"
KIND_SHARES = {
    "broken_404": 0.04,
    "corrupt": 0.03,
    "tiny": 0.03,
    "url_duplicate": 0.05,
    "image_duplicate": 0.05,
    "near_duplicate": 0.03,
}


@dataclass
class Served:
    host: str
    path: str
    body: bytes | None  # None: not served (404)
    content_type: str = "image/jpeg"


@dataclass
class DemoData:
    rows: pl.DataFrame  # the input rows (URL, TEXT, site) plus ground truth columns
    served: list[Served] = field(default_factory=list)

    def input_columns(self) -> pl.DataFrame:
        return self.rows.select("URL", "TEXT", "site")


def _choice(rng: np.random.Generator, weights: dict[str, float] | tuple, items=None):
    if isinstance(weights, dict):
        items, p = list(weights), np.array(list(weights.values()))
    else:
        p = np.array(weights)
    p = p / p.sum()
    return items[int(rng.choice(len(items), p=p))]


def generate(n_rows: int, seed: int, ports: dict[str, int]) -> DemoData:
    """`ports` maps each site's host to the port its server listens on."""
    rng = np.random.default_rng(seed)
    recs: list[dict] = []
    served: list[Served] = []
    originals: list[int] = []  # indices of unique, fetchable rows that copies may duplicate

    for i in range(n_rows):
        host, site = _choice(rng, SITE_WEIGHTS, SITES)
        base = f"http://{host}:{ports[host]}"
        lang = _choice(rng, LANGUAGE_WEIGHTS)
        r = rng.random()
        kind, acc = "unique", 0.0
        for k, share in KIND_SHARES.items():
            acc += share
            if r < acc:
                kind = k
                break
        if kind in ("url_duplicate", "image_duplicate", "near_duplicate") and not originals:
            kind = "unique"

        rec = {"row_kind": kind, "site": site, "gt_language": lang, "duplicate_of_index": None}
        if kind in ("url_duplicate", "image_duplicate", "near_duplicate"):
            j = originals[int(rng.integers(len(originals)))]
            orig = recs[j]
            rec["duplicate_of_index"] = j
            rec["matched"] = orig["matched"]
            rec["gt_language"] = orig["gt_language"]
            rec["TEXT"] = synthetic.caption(orig["_caption_attrs"], orig["gt_language"], rng)
            rec["_caption_attrs"] = orig["_caption_attrs"]
            rec["_image_attrs"] = orig["_image_attrs"]  # a copy shows the original's picture
            rec["_size"] = orig["_size"]
            if kind == "url_duplicate":
                # same image URL, spelled differently: host case, explicit default-less port kept, a fragment
                rec["URL"] = orig["URL"].replace("http://", "HTTP://") + "#dup"
            else:
                path = f"/img/{i}.jpg"
                rec["URL"] = f"http://{orig['_host']}:{ports[orig['_host']]}{path}"
                body = orig["_body"] if kind == "image_duplicate" else _reencode(orig["_body"])
                served.append(Served(orig["_host"], path, body))
            rec["_host"] = orig["_host"]
            recs.append(rec)
            continue

        attrs = synthetic.random_attrs(rng)
        matched = bool(rng.random() >= MISMATCH_RATE)
        cap_attrs = attrs if matched else synthetic.mismatched_attrs(attrs, rng)
        if kind == "tiny":
            w, h = int(rng.integers(12, DEMO_MIN_SIDE - 4)), int(rng.integers(12, DEMO_MIN_SIDE - 4))
        else:
            w, h = int(rng.integers(64, 200)), int(rng.integers(64, 200))
        path = f"/img/{i}.jpg"
        url = f"{base}{path}"
        body: bytes | None = None
        if kind == "broken_404":
            pass  # never registered: the server answers 404
        elif kind == "corrupt":
            body = b"\xff\xd8\xff\xe0" + rng.bytes(600)
            served.append(Served(host, path, body))
        else:
            body = synthetic.to_jpeg(synthetic.render(attrs, rng, w, h), quality=90)
            served.append(Served(host, path, body))
        rec.update(
            URL=url,
            TEXT=synthetic.caption(cap_attrs, lang, rng),
            matched=matched,
            _caption_attrs=cap_attrs,
            _image_attrs=attrs if body is not None and kind != "corrupt" else None,  # what the image shows
            _size=(w, h),
            _host=host,
            _body=body,
        )
        if kind == "unique":
            originals.append(i)
        recs.append(rec)

    df = pl.DataFrame(
        {
            "URL": [r["URL"] for r in recs],
            "TEXT": [r["TEXT"] for r in recs],
            "site": [r["site"] for r in recs],
            "index": list(range(len(recs))),
            "row_kind": [r["row_kind"] for r in recs],
            "matched": [bool(r["matched"]) for r in recs],
            "gt_language": [r["gt_language"] for r in recs],
            "duplicate_of_index": pl.Series([r["duplicate_of_index"] for r in recs], dtype=pl.Int64),
            # what each served image shows (null where no decodable image is served: 404s, corrupt bytes)
            "image_shape": pl.Series([a.shape if (a := r["_image_attrs"]) else None for r in recs], dtype=pl.String),
            "image_color": pl.Series([a.color if (a := r["_image_attrs"]) else None for r in recs], dtype=pl.String),
        }
    )
    return DemoData(df, served)


def _reencode(jpeg: bytes) -> bytes:

    img = Image.open(BytesIO(jpeg)).convert("RGB")
    return synthetic.to_jpeg(img, quality=55)


def expected_outcome(rows: pl.DataFrame) -> pl.Series:
    """What a correct pipeline should do with each row, from ground truth alone:
    "keep" for matched, unique, fetchable pairs in an allowed language; otherwise the reason family.
    Every member of a duplicate group (exact URL or bytes copies, and re-encoded near-duplicate
    copies), the original included, is "duplicate": one of the group survives, and which one
    depends on the scores."""
    copied = set(rows.filter(pl.col("row_kind").is_in(DUPLICATE_KINDS))["duplicate_of_index"].to_list())
    out = []
    for index, kind, matched, lang in zip(rows["index"], rows["row_kind"], rows["matched"], rows["gt_language"]):
        if lang not in DEMO_ALLOWED_LANGUAGES:
            out.append("language")
        elif kind in ("broken_404", "corrupt"):
            out.append("fetch_failed")
        elif kind == "tiny":
            out.append("image_size")
        elif kind in DUPLICATE_KINDS or index in copied:
            out.append("duplicate")  # the original and its copies: one of the group survives
        elif not matched:
            out.append("clip_score")
        else:
            out.append("keep")
    return pl.Series("expected", out)
