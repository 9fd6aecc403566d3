"""Exact dynamic text length: cutting a token batch to its longest real caption gives the padded
77-token features (up to fp summation order), on the bundled model and on LAION captions; models
where it would not be exact fall back to open_clip's encode_text; distinct captions map back."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from curate.config import ScoreConfig
from curate.model import load_clip
from curate.stages.score import ClipScorer
from curate.text_length import encode_text_trimmed, real_length, supports_trim, unique_index
from test_score_precision import _laion_captions


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(2)
    return load_clip("curate-tiny", "bundled", device="cpu", precision="fp32")


def test_trimmed_equals_padded_on_laion_captions(clip):
    caps = _laion_captions(640)
    tokens = clip.tokenizer(caps)
    assert clip.model.text_pool_type == "argmax" and supports_trim(clip.model)
    worst, cut = 0.0, []
    with torch.inference_mode():
        for s in range(0, len(caps), 32):
            t = tokens[s : s + 32]
            cut.append(real_length(t))
            worst = max(worst, float((clip.model.encode_text(t) - encode_text_trimmed(clip.model, t)).abs().max()))
    print(f"max |delta| {worst:.2e}; batch lengths {min(cut)}..{max(cut)} of 77")
    assert worst <= 1e-5
    assert min(cut) < 77  # the test really cuts


def test_eot_position_is_kept():
    t = torch.tensor([[49406, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0]])
    assert real_length(t) == 3
    assert real_length(torch.zeros(2, 5, dtype=torch.long)) == 1


def test_falls_back_where_trimming_is_not_exact(clip):
    m = copy.deepcopy(clip.model)
    m.text_pool_type = "last"  # pools position 76: padding matters
    assert not supports_trim(m)
    tokens = clip.tokenizer(["a red circle", "ein blaues Quadrat auf grünem Grund"])
    with torch.inference_mode():
        assert torch.equal(encode_text_trimmed(m, tokens), m.encode_text(tokens))
    m2 = copy.deepcopy(clip.model)
    m2.attn_mask = torch.zeros(77, 77)  # bidirectional: padding is attended to
    assert not supports_trim(m2)


def test_distinct_captions_and_input_order(clip):
    distinct, inv = unique_index(["b", "a", "b", "c", "a"])
    assert distinct == ["b", "a", "c"] and inv == [0, 1, 0, 2, 1]
    scorer = ClipScorer(ScoreConfig(precision="fp32", batch_size=4), device="cpu")
    caps = _laion_captions(20) + ["a red circle"] * 3
    got = scorer.encode_texts(caps)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(caps)), dim=-1)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def test_token_budget_batches_cover_every_row_within_a_padded_batch():
    from curate.stages.score import token_budget_batches

    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(2, 78, 500)).tolist()
    batches = token_budget_batches(lengths, 32, 77)
    assert batches[0][0] == 0 and batches[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(batches, batches[1:]))  # contiguous, no row twice or lost
    for s, e in batches:
        assert e - s >= min(32, 500 - s)  # never fewer rows than a plain batch
        assert e - s <= 32 or (e - s) * lengths[e - 1] <= 32 * 77  # bigger only within the token budget
    assert max(e - s for s, e in batches) > 32  # short captions really share bigger batches


def test_big_batches_of_short_captions_score_the_same(clip):
    """encode_texts with token-budget batches equals the plain padded model, caption by caption."""
    scorer = ClipScorer(ScoreConfig(precision="fp32", batch_size=8), device="cpu")
    caps = _laion_captions(300)
    got = scorer.encode_texts(caps)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(caps)), dim=-1)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
