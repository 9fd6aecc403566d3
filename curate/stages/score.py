"""CLIP scoring stage: cosine similarity between each row's image and its caption.

``ClipScorer`` is shaped for a Ray actor (one model per actor, loaded once in ``__init__``) and
for Ray Data ``map_batches(ClipScorer, fn_constructor_args=(cfg,), batch_format="pyarrow")``; it
is equally usable directly:

    scorer = ClipScorer(ScoreConfig())                 # curate-tiny, bundled checkpoint
    scorer.score([jpeg_bytes, ...], ["a caption", ...])  # float32, NaN where the image is unusable
    scorer.score_for_dedup(images, captions)            # + float16 image embeddings, uint64 pHashes
    scorer(table)                                      # table + float32 "clip_score" column

Scores come back in input order whatever the batching: every score is written back to the row
index it came from. A row whose image bytes cannot be decoded (or are null/empty), or whose caption
is null, scores NaN; it never raises and never shifts another row's score.

How the work is done (docs/PERFORMANCE.md has the measurements):

- Rows are taken in windows of ``TEXT_WINDOW`` rows. In a window each *distinct* caption is
  tokenized and embedded once; the distinct captions are sorted by token length and embedded in
  batches cut to their longest real caption (exact for causal text towers: curate/text_length.py).
- Images are decoded and preprocessed in batches of ``cfg.batch_size`` on a background thread
  (``cfg.decode_threads``), one batch ahead of the image tower, so decode overlaps the model.
- The towers run in the precision ``load_clip`` resolved (``clip.precision``: "auto" is fp16 on
  CUDA, bf16 weights on CPUs with native bf16, else fp32); features are normalised in fp32.
"""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from curate import schema
from curate.config import ScoreConfig
from curate.model import LoadedClip, load_clip
from curate.stages.phash import phash64
from curate.text_length import encode_text_trimmed, real_length, unique_index

TEXT_WINDOW = 4096  # rows whose distinct captions are embedded together (length-sorted)


class ClipScorer:
    def __init__(self, cfg: ScoreConfig, device: Optional[str] = None):
        if cfg.source != "model":
            raise ValueError("ClipScorer needs score.source = 'model' (source='column' reads an input column)")
        self.cfg = cfg
        self.clip: LoadedClip = load_clip(
            cfg.model, cfg.pretrained, device=device, precision=cfg.precision, threads=cfg.cpu_threads
        )
        self.batch_size = cfg.batch_size
        self.decode_threads = 1 if cfg.decode_threads is None else cfg.decode_threads  # null: the layout's CPU default
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def model_id(self) -> str:
        """ "<architecture>/<pretrained label>", e.g. "curate-tiny/bundled:0123456789ab"."""
        return self.clip.model_id

    # ----------------------------------------------------------------------------------------------
    def _decode(self, data: Any, phash: bool = False) -> tuple[Optional[torch.Tensor], int]:
        """(pixels, perceptual hash when asked for, else 0); (None, 0) for an unusable image."""
        if not data:
            return None, 0
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
            return self.clip.preprocess(rgb), (phash64(rgb) if phash else 0)
        except Exception:  # undecodable, truncated, decompression bomb, odd mode: no score
            return None, 0

    def _decode_batch(
        self, images: Sequence[Any], rows: Sequence[int], phash: bool = False
    ) -> tuple[list[int], Optional[torch.Tensor], list[int]]:
        ok: list[int] = []
        pixels: list[torch.Tensor] = []
        hashes: list[int] = []
        for i in rows:
            px, h = self._decode(images[i], phash)
            if px is not None:
                ok.append(i)
                pixels.append(px)
                hashes.append(h)
        return ok, (torch.stack(pixels) if pixels else None), hashes

    def _decoded_batches(
        self, images: Sequence[Any], rows: list[int], phash: bool = False
    ) -> Iterator[tuple[list[int], Optional[torch.Tensor], list[int]]]:
        """(usable rows, pixel batch) per chunk of ``batch_size`` candidate rows; with decode
        threads, chunk k+1 is decoded while the caller runs the model on chunk k."""
        chunks = [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        if self.decode_threads <= 0 or len(chunks) <= 1:
            for c in chunks:
                yield self._decode_batch(images, c, phash)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="curate-decode")
        ahead = max(1, self.decode_threads)
        pending: list[Future] = [self._pool.submit(self._decode_batch, images, c, phash) for c in chunks[:ahead]]
        nxt = ahead
        while pending:
            fut = pending.pop(0)
            if nxt < len(chunks):
                pending.append(self._pool.submit(self._decode_batch, images, chunks[nxt], phash))
                nxt += 1
            yield fut.result()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.clip.device.type == "cuda":
            return t.pin_memory().to(self.clip.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 image features for a preprocessed batch [B, 3, H, W]."""
        clip = self.clip
        x = self._to_device(pixels).to(clip.input_dtype)
        with clip.autocast():
            f = clip.model.encode_image(x)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """L2-normalised fp32 text features, one row per caption, in input order. Captions are
        embedded in batches sorted by token length, each cut to its longest real caption."""
        clip = self.clip
        if not captions:
            return torch.empty(0, 0)
        tokens = clip.tokenizer(list(captions))
        lengths = (tokens != 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        out: Optional[torch.Tensor] = None
        for s, e in token_budget_batches(lengths[order].tolist(), max(self.batch_size, 1), tokens.shape[1]):
            idx = order[s:e]
            tok = tokens[idx]
            tok = tok[:, : real_length(tok)]  # also cuts the host->device copy
            with clip.autocast():
                f = encode_text_trimmed(clip.model, self._to_device(tok))
            f = torch.nn.functional.normalize(f.float(), dim=-1)
            if out is None:
                out = torch.empty(len(captions), f.shape[1], dtype=torch.float32, device=f.device)
            out[idx.to(f.device)] = f
        return out

    # ----------------------------------------------------------------------------------------------
    def score(self, images: Sequence[Optional[bytes]], captions: Sequence[Optional[str]]) -> np.ndarray:
        """Cosine similarity of each (image bytes, caption) pair, float32, in input order; NaN for
        rows with an undecodable/missing image or a missing caption."""
        return self._score(images, captions, for_dedup=False)[0]

    def score_for_dedup(
        self, images: Sequence[Optional[bytes]], captions: Sequence[Optional[str]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """score() plus what near-duplicate image dedup needs, from the same decoded images:
        (scores float32 [n], L2-normalised image embeddings float16 [n, d], 64-bit perceptual
        hashes uint64 [n], curate/stages/phash.py). An embedding row is all NaN and a hash 0
        exactly where the score is NaN (unusable image, or a missing caption: not encoded)."""
        scores, emb, ph = self._score(images, captions, for_dedup=True)
        assert emb is not None
        return scores, emb, ph

    def _embedding_dim(self) -> int:
        d = getattr(getattr(self.clip.model, "visual", None), "output_dim", None)
        if d is None:
            with torch.inference_mode():
                px = self.clip.preprocess(Image.new("RGB", (32, 32)))
                d = int(self.encode_images(px[None]).shape[1])
        return int(d)

    def _score(
        self, images: Sequence[Optional[bytes]], captions: Sequence[Optional[str]], for_dedup: bool
    ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = np.full(len(images), np.nan, dtype=np.float32)
        emb: Optional[np.ndarray] = None
        if for_dedup:
            emb = np.full((len(images), self._embedding_dim()), np.nan, dtype=np.float16)
        phashes = np.zeros(len(images), dtype=np.uint64)
        for start in range(0, len(images), TEXT_WINDOW):
            stop = min(start + TEXT_WINDOW, len(images))
            rows = [i for i in range(start, stop) if captions[i] is not None and images[i]]
            if not rows:
                continue
            batches = self._decoded_batches(images, rows, for_dedup)  # starts decoding now
            first = next(batches, None)
            distinct, inverse = unique_index([str(captions[i]) for i in rows])
            text = self.encode_texts(distinct)
            where = {r: k for k, r in enumerate(rows)}
            inverse_t = torch.as_tensor(inverse, dtype=torch.long, device=text.device)
            for ok, pixels, hashes in _chain(first, batches):
                if pixels is None:
                    continue
                img = self.encode_images(pixels)
                t = text[inverse_t[torch.as_tensor([where[r] for r in ok], device=text.device)]]
                ok_np = np.asarray(ok, dtype=np.int64)
                out[ok_np] = (img * t).sum(dim=-1).cpu().numpy().astype(np.float32)
                if emb is not None:
                    emb[ok_np] = img.cpu().numpy().astype(np.float16)
                    phashes[ok_np] = np.asarray(hashes, dtype=np.uint64)
        return out, emb, phashes

    def __call__(self, batch: pa.Table | dict) -> pa.Table | dict:
        """Append a float32 ``clip_score`` column (replacing one already there) to a batch with
        ``jpg`` (binary) and ``caption`` (string) columns: a pyarrow Table, or a dict of columns
        (Ray Data's "numpy" batch format)."""
        if isinstance(batch, pa.Table):
            scores = pa.array(
                self.score(batch.column(schema.IMAGE_BYTES).to_pylist(), batch.column(schema.CAPTION).to_pylist()),
                type=pa.float32(),
            )
            if schema.CLIP_SCORE in batch.column_names:
                return batch.set_column(batch.column_names.index(schema.CLIP_SCORE), schema.CLIP_SCORE, scores)
            return batch.append_column(schema.CLIP_SCORE, scores)
        if isinstance(batch, dict):
            images = [None if v is None else bytes(v) for v in batch[schema.IMAGE_BYTES]]
            captions = [None if v is None else str(v) for v in batch[schema.CAPTION]]
            return {**batch, schema.CLIP_SCORE: self.score(images, captions)}
        raise TypeError(f"expected a pyarrow.Table or a dict of columns, not {type(batch).__name__}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def token_budget_batches(sorted_lengths: Sequence[int], batch_size: int, context: int) -> list[tuple[int, int]]:
    """(start, stop) batches over captions sorted by token length: as many captions as fit in the
    tokens of one padded batch (batch_size x context), i.e. rows x longest length <= that budget,
    never fewer than batch_size rows. Short captions go in big batches (better matrix shapes),
    and no batch holds more activations than a padded batch of batch_size would."""
    budget = batch_size * context
    out, s, n = [], 0, len(sorted_lengths)
    while s < n:
        e = min(s + batch_size, n)
        while e < n and (e + 1 - s) * max(int(sorted_lengths[e]), 1) <= budget:
            e += 1
        out.append((s, e))
        s = e
    return out


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
