"""DataComp's precomputed embeddings as a run's image embeddings (input.embeddings).

CommonPool ships, beside each metadata parquet `<shard>.parquet`, a `<shard>.npz` with the OpenAI
CLIP embeddings of every row: `l14_img`, `l14_txt` (ViT-L/14, 768-d) and `b32_img`, `b32_txt`
(ViT-B/32, 512-d), float16, row i of each array belonging to row i of the parquet. With
input.embeddings = {key = "l14"} the read of each shard (curate/shard_jobs.py prepare_shard) also
writes the chosen image embeddings of the rows it keeps to embeddings/<shard>.parquet, the file a
scoring run writes with score.store_embeddings, so concept tags (curate/concepts.py) and image
near-dedup (filters/image_dedup.py) run on a DataComp pool without fetching an image. (No
perceptual hash comes with them: dedup.image_phash_max_distance needs fetched images.)

Row alignment is checked before anything is written, and a mismatch is refused with the file named:
  - the npz must hold as many rows as the parquet;
  - where the parquet has the key's similarity column (clip_l14_similarity_score /
    clip_b32_similarity_score: DataComp computed it from the same embeddings), every row's
    cosine of its image and text embeddings must match it within ALIGN_TOLERANCE (float16
    rounding moves a cosine by ~1e-3; a row paired with another row's embeddings is off by ~0.1).
Embeddings are stored as given when they are unit vectors (within 1e-2), else normalised first.
"""

from __future__ import annotations

import io as _io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import io, schema
from curate.config import InputConfig, PrecomputedEmbeddings

ALIGN_TOLERANCE = 0.01
SCORE_COLUMN = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}


class EmbeddingsMismatch(ValueError):
    """A precomputed-embeddings file that does not belong to its metadata rows; names the file."""


def npz_path(parquet_path: str) -> str:
    """`<shard>.npz` beside `<shard>.parquet`, as DataComp lays them out."""
    base = parquet_path[: -len(".parquet")] if parquet_path.endswith(".parquet") else parquet_path
    return base + ".npz"


def read_npz(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) embeddings of key `key` (l14 or b32) from a DataComp npz; clear errors naming
    the file for a missing file, key or shape."""
    if not io.exists(path):
        raise EmbeddingsMismatch(f"{path}: no precomputed embeddings file beside the metadata (input.embeddings)")
    fs, p = io.fs_and_path(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    try:
        npz = np.load(_io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EmbeddingsMismatch(f"{path}: not a numpy .npz file ({e})") from None
    with npz:
        missing = [k for k in (f"{key}_img", f"{key}_txt") if k not in npz.files]
        if missing:
            raise EmbeddingsMismatch(f"{path}: no {', '.join(missing)} (it holds {', '.join(sorted(npz.files))})")
        img, txt = npz[f"{key}_img"], npz[f"{key}_txt"]
    if img.ndim != 2 or txt.shape != img.shape:
        raise EmbeddingsMismatch(f"{path}: {key}_img is {img.shape} and {key}_txt {txt.shape}; want two (rows, d)")
    return img, txt


def check_alignment(path: str, img: np.ndarray, txt: np.ndarray, rows: int, scores: np.ndarray | None) -> None:
    """Refuse embeddings that are not the metadata's rows (module doc): the row count, and each
    row's image-text cosine against the metadata's similarity column when it has one."""
    if len(img) != rows:
        raise EmbeddingsMismatch(
            f"{path}: {len(img)} rows of embeddings, but its metadata parquet has {rows} rows; they must be row-aligned"
        )
    if scores is None:
        return
    cos = (img.astype(np.float32) * txt.astype(np.float32)).sum(axis=1)
    known = ~np.isnan(scores)
    off = known & ~(np.abs(cos - scores) <= ALIGN_TOLERANCE)
    if off.any():
        first = int(np.argmax(off))
        raise EmbeddingsMismatch(
            f"{path}: {int(off.sum())} of {int(known.sum())} rows' image-text cosine differs from the metadata's "
            f"similarity column by more than {ALIGN_TOLERANCE} (first: row {first}, {cos[first]:.4f} vs "
            f"{scores[first]:.4f}): the embeddings are not row-aligned with the metadata"
        )


def _unit(img: np.ndarray) -> np.ndarray:
    """float16 unit vectors: as given when they already are (within 1e-2), else normalised."""
    x = img.astype(np.float32)
    norms = np.linalg.norm(x, axis=1)
    if np.all(np.abs(norms - 1) <= 1e-2):
        return img.astype(np.float16)
    return (x / np.maximum(norms, 1e-12)[:, None]).astype(np.float16)


def embeddings_table(rows: np.ndarray, emb: np.ndarray) -> pa.Table:
    """embeddings/<shard>.parquet's rows (as curate/shard_jobs.py writes them): row, image_embedding
    list<float16>, image_phash uint64 (null: no image, no perceptual hash)."""
    n, d = emb.shape
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float16).reshape(-1), type=pa.float16())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), type=pa.int32())
    return pa.table(
        {
            schema.ROW: pa.array(np.asarray(rows, dtype=np.int64)),
            schema.IMAGE_EMBEDDING: pa.ListArray.from_arrays(offsets, values),
            schema.IMAGE_PHASH: pa.nulls(n, pa.uint64()),
        }
    )


def shard_embeddings(parquet_path: str, cfg: InputConfig, rows: np.ndarray) -> pa.Table:
    """The embeddings table of rows `rows` (0-based row indices of the metadata parquet) of one
    shard, read from its npz and checked against the whole parquet (module doc)."""
    assert cfg.embeddings is not None
    key = cfg.embeddings.key
    path = npz_path(parquet_path)
    img, txt = read_npz(path, key)
    fs, p = io.fs_and_path(parquet_path)
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f)
        n = meta.metadata.num_rows
        scores = None
        if SCORE_COLUMN[key] in meta.schema_arrow.names:
            col = meta.read(columns=[SCORE_COLUMN[key]]).column(0)
            scores = col.cast(pa.float32()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    check_alignment(path, img, txt, n, scores)
    rows = np.asarray(rows, dtype=np.int64)
    return embeddings_table(rows, _unit(img[rows]))


def describe(emb: PrecomputedEmbeddings) -> dict[str, Any]:
    """The manifest's "embeddings_model": what made the run's image embeddings, with the model id
    the text tower of the same checkpoint reports (curate/model.py model_id_of), so that concept
    prompts are embedded by that very model (curate/concepts.py)."""
    # lazy: torch (seconds); only a run that reads precomputed embeddings names their checkpoint
    from curate.model import model_id_of

    return {
        "model": emb.model_name,
        "pretrained": emb.weights,
        "model_id": model_id_of(emb.model_name, emb.weights),
        "source": f"input npz: {emb.key}_img",
    }
