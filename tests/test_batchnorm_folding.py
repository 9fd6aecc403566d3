"""Folding a ResNet image tower's BatchNorms into its convolutions (curate/batchnorm_folding.py):
the same features in fp32, no BatchNorm left, anything else untouched; the bf16-image path folds."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch

from curate.batchnorm_folding import fold_resnet_batchnorm
from curate.demo import synthetic as S
from curate.model import load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("curate-tiny", "bundled", device="cpu", precision="fp32")


def _images(clip, n=48):
    rng = np.random.default_rng(3)
    return torch.stack([clip.preprocess(S.render(S.random_attrs(rng), rng, 96, 80)) for _ in range(n)])


def _batchnorms(module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


def test_folding_keeps_the_features_and_leaves_no_batchnorm(clip):
    visual = copy.deepcopy(clip.model.visual)
    before = _batchnorms(visual)
    assert before > 0  # the bundled model's tower is a ModifiedResNet
    assert fold_resnet_batchnorm(visual) == before
    assert _batchnorms(visual) == 0
    x = _images(clip)
    with torch.inference_mode():
        want, got = clip.model.visual(x), visual(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert _batchnorms(clip.model.visual) == before  # the loaded fp32 model is not touched


def test_other_towers_and_training_mode_are_left_alone(clip):
    vit = open_clip.model.CLIP(
        64,
        {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).visual.eval()
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    assert fold_resnet_batchnorm(vit) == 0
    assert all(torch.equal(v, state[k]) for k, v in vit.state_dict().items())
    training = copy.deepcopy(clip.model.visual).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_resnet_batchnorm(training)


def test_the_bf16_image_path_folds_then_casts(clip):
    bf16 = load_clip("curate-tiny", "bundled", device="cpu", precision="bf16-image")
    assert _batchnorms(bf16.model.visual) == 0
    assert {p.dtype for p in bf16.model.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.model.transformer.parameters()} == {torch.float32}
    x = _images(clip)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)
        got = torch.nn.functional.normalize(bf16.model.encode_image(x.to(torch.bfloat16)).float(), dim=-1)
    assert float((got * want).sum(-1).min()) > 0.99
