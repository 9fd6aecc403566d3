"""CLIP scoring stage: cosine similarity between each row's image and its caption.

``ClipScorer`` is shaped for a Ray actor (one model per actor, loaded once in ``__init__``) and
for Ray Data ``map_batches(ClipScorer, fn_constructor_args=(cfg,), batch_format="pyarrow")``; it
is equally usable directly:

    scorer = ClipScorer(ScoreConfig())                 # curate-tiny, bundled checkpoint
    scorer.score([jpeg_bytes, ...], ["a caption", ...])  # float32, NaN where the image is unusable
    scorer(table)                                      # table + float32 "clip_score" column

Scores come back in input order whatever the batching: rows are scored in batches of
``cfg.batch_size`` usable rows, and every score is written back to the row index it came from. A
row whose image bytes cannot be decoded (or are null/empty), or whose caption is null, scores NaN;
it never raises and never shifts another row's score.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from curate import schema
from curate.config import ScoreConfig
from curate.model import LoadedClip, load_clip


class ClipScorer:
    def __init__(self, cfg: ScoreConfig, device: Optional[str] = None):
        if cfg.source != "model":
            raise ValueError("ClipScorer needs score.source = 'model' (source='column' reads an input column)")
        self.cfg = cfg
        self.clip: LoadedClip = load_clip(
            cfg.model, cfg.pretrained, device=device, precision=cfg.precision, threads=cfg.cpu_threads)
        self.batch_size = cfg.batch_size

    @property
    def model_id(self) -> str:
        """"<architecture>/<pretrained label>", e.g. "curate-tiny/bundled:0123456789ab"."""
        return self.clip.model_id

    # ----------------------------------------------------------------------------------------------
    def _decode(self, data: Any) -> Optional[torch.Tensor]:
        if not data:
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
            return self.clip.preprocess(rgb)
        except Exception:  # undecodable, truncated, decompression bomb, odd mode: no score
            return None

    @torch.inference_mode()
    def _score_batch(self, pixels: list[torch.Tensor], captions: list[str]) -> np.ndarray:
        clip = self.clip
        x = torch.stack(pixels)
        tokens = clip.tokenizer(captions)
        if clip.device.type == "cuda":
            x = x.pin_memory().to(clip.device, non_blocking=True)
            tokens = tokens.pin_memory().to(clip.device, non_blocking=True)
        else:
            x, tokens = x.to(clip.device), tokens.to(clip.device)
        x = x.to(clip.input_dtype)
        with clip.autocast():
            image_features = clip.model.encode_image(x)
            text_features = clip.model.encode_text(tokens)
        # normalise in fp32, whatever precision the towers ran in
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        return (image_features * text_features).sum(dim=-1).cpu().numpy().astype(np.float32)

    def score(self, images: Sequence[Optional[bytes]], captions: Sequence[Optional[str]]) -> np.ndarray:
        """Cosine similarity of each (image bytes, caption) pair, float32, in input order; NaN for
        rows with an undecodable/missing image or a missing caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = np.full(len(images), np.nan, dtype=np.float32)
        rows: list[int] = []
        pixels: list[torch.Tensor] = []
        texts: list[str] = []

        def flush() -> None:
            if rows:
                out[np.asarray(rows, dtype=np.int64)] = self._score_batch(pixels, texts)
                rows.clear()
                pixels.clear()
                texts.clear()

        for i, (data, text) in enumerate(zip(images, captions)):
            if text is None:
                continue
            px = self._decode(data)
            if px is None:
                continue
            rows.append(i)
            pixels.append(px)
            texts.append(str(text))
            if len(rows) >= self.batch_size:
                flush()
        flush()
        return out

    def __call__(self, batch: pa.Table | dict) -> pa.Table | dict:
        """Append a float32 ``clip_score`` column (replacing one already there) to a batch with
        ``jpg`` (binary) and ``caption`` (string) columns: a pyarrow Table, or a dict of columns
        (Ray Data's "numpy" batch format)."""
        if isinstance(batch, pa.Table):
            scores = pa.array(
                self.score(batch.column(schema.IMAGE_BYTES).to_pylist(), batch.column(schema.CAPTION).to_pylist()),
                type=pa.float32())
            if schema.CLIP_SCORE in batch.column_names:
                return batch.set_column(batch.column_names.index(schema.CLIP_SCORE), schema.CLIP_SCORE, scores)
            return batch.append_column(schema.CLIP_SCORE, scores)
        if isinstance(batch, dict):
            images = [None if v is None else bytes(v) for v in batch[schema.IMAGE_BYTES]]
            captions = [None if v is None else str(v) for v in batch[schema.CAPTION]]
            return {**batch, schema.CLIP_SCORE: self.score(images, captions)}
        raise TypeError(f"expected a pyarrow.Table or a dict of columns, not {type(batch).__name__}")
