"""Exact dynamic text length for open_clip's text tower, and one embedding per distinct caption.

open_clip's tokenizer pads every caption to ``context_length`` (77) tokens and ``CLIP.encode_text``
runs the transformer over all 77 positions. LAION captions are ~15-25 tokens, so most of that work
is on padding. With a *causal* attention mask, position i attends only to positions <= i, so the
activations of the real tokens do not depend on the padding after them; and the pooled feature is
taken at the EOT token (pool "argmax": EOT has the highest token id; pool "eos": the first EOT id;
pool "first": position 0), which lies inside the real tokens. Cutting the batch's token matrix to
its longest real caption (and the causal mask and positional embedding to the same length) is
therefore exact up to floating-point summation order (measured max |delta| ~1e-6, see
tests/test_text_length.py).

We apply it only where all of that holds, and fall back to ``model.encode_text`` on padded tokens
otherwise (CustomTextCLIP/HF text towers, pool "last"/none, no causal mask, a padding id other
than 0): the fallback is the reference, never a guess.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _is_causal(mask: torch.Tensor | None) -> bool:
    """An additive causal mask: 0 on and below the diagonal, -inf above it."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    n = mask.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=mask.device), diagonal=1)
    m = mask.float()
    return bool(torch.isneginf(m[upper]).all()) and bool((m[~upper] == 0).all())


def supports_trim(model: torch.nn.Module) -> bool:
    """True when trimming padding is exact for this model's text tower (see module docstring)."""
    # lazy: open_clip adds ~3.4 s over torch; load_clip has imported it by the time a model gets here
    import open_clip

    if not isinstance(model, open_clip.CLIP):
        return False
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos", "first"):
        return False
    if getattr(model.transformer, "batch_first", True) is not True:
        return False
    mask = getattr(model, "attn_mask", None)
    key = (id(mask), None if mask is None else mask.data_ptr())
    cached = getattr(model, "_curate_causal", None)  # (key, verdict): re-checked if the mask changes
    if cached is None or cached[0] != key:
        cached = (key, _is_causal(mask))
        model._curate_causal = cached  # type: ignore[attr-defined]
    return cached[1]


def real_length(tokens: torch.Tensor) -> int:
    """Columns needed to keep every real token of the batch: index of the last non-pad (non-zero)
    token in any row, plus one (at least 1)."""
    nz = tokens != 0
    if not bool(nz.any()):
        return 1
    cols = nz.any(dim=0).nonzero()
    return int(cols[-1].item()) + 1


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised), computed on the batch's real length only when
    that is exact for ``model``; otherwise exactly ``model.encode_text(tokens)``."""
    if not supports_trim(model):
        return model.encode_text(tokens)
    # lazy: open_clip adds ~3.4 s over torch; load_clip has imported it by the time a model gets here
    from open_clip.model import text_global_pool

    n = real_length(tokens)
    text = tokens[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def unique_index(captions: Sequence[str]) -> tuple[list[str], list[int]]:
    """(distinct captions in first-seen order, index of each input caption into them)."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(c, len(first)) for c in captions]
    return list(first), inverse
