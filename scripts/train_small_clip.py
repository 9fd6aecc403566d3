#!/usr/bin/env python
"""Train the bundled tiny CLIP model (curate/assets/curate-tiny.json) on synthetic pairs.

    .venv/bin/python scripts/train_small_clip.py [--steps N] [--out PATH]

Images and captions come from curate.demo.synthetic (coloured shapes on coloured backgrounds, captions
in every language of synthetic.LANGUAGES), generated on the fly with fixed seeds. The model is
built by open_clip.create_model_and_transforms("curate-tiny") from the bundled config: open_clip's
ModifiedResNet image tower (layers [1, 1, 1, 1], width 16, attention pooling) and a 4-layer text
transformer. A ViT of the same size (patch 8 on 64 px) learned colours in 600 steps but told shapes
apart badly (a shape concept's ROC-AUC 0.55-0.85); the convolutional tower learns shapes within 500.
The images go through the model's own eval preprocess (resize + centre crop + normalise with the
model's mean/std): the exact transform scoring uses.

Each batch holds distinct attributes, `--shape-groups` (colour, background) pairs of them with all
six shapes (negatives that differ only in the shape), the rest at random. A `--short` share of the
captions are short English prompts of the kind concepts use ("a triangle", "a red shape"); such a
caption describes every image in the batch with its attributes, so the loss is open_clip's ClipLoss
with soft targets spread over every caption-image pair that matches (multi_positive_clip_loss; with
full captions only, it is ClipLoss exactly). AdamW, warmup and cosine decay as open_clip_train.

The checkpoint is a safetensors state_dict with floating tensors stored as fp16 (half the bytes;
the 49408-row token embedding dominates). open_clip loads it into the fp32 model unchanged: the
script reloads it through create_model_and_transforms(pretrained=<path>) and reports the held-out
ROC-AUC of that reloaded model, matched vs mismatched captions, on pairs from a seed not used in
training, and each shape as a concept (prompt "a <shape>" against the other shapes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from curate.demo import synthetic as S  # noqa: E402

MODEL = "curate-tiny"
ASSETS = REPO / "curate" / "assets"
TRAIN_SEED = 0
EVAL_SEED = 10_001  # held out: never used to generate training data
TRAIN_SIZES = ((64, 64), (48, 48), (56, 72), (96, 64), (64, 96), (80, 80), (128, 96), (128, 128))
ALL_ATTRS = [S.Attrs(s, c, b) for s, c, b in itertools.product(S.SHAPES, S.COLORS, S.BACKGROUNDS)]


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Rank-based ROC-AUC (Mann-Whitney U), ties counted as half."""
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# Short English captions name one or two attributes, as a concept's prompts do ("a triangle", "a red
# shape"). Each is a template and the attributes it constrains; a short caption describes every image
# in the batch with those attributes, so the loss counts all of them as its positives.
SHORT_CAPTIONS = (
    ("a {shape}", ("shape",)),
    ("a photo of a {shape}", ("shape",)),
    ("a {color} shape", ("color",)),
    ("{color_an} {shape}", ("shape", "color")),
)


def short_caption(a: S.Attrs, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    template, constrains = SHORT_CAPTIONS[int(rng.integers(len(SHORT_CAPTIONS)))]
    text = template.format(shape=a.shape, color=a.color, color_an=("an " if a.color[0] in "aeiou" else "a ") + a.color)
    return text, constrains


def batch_attrs(rng: np.random.Generator, batch_size: int, shape_groups: int) -> list[S.Attrs]:
    """Distinct attributes: `shape_groups` (colour, background) pairs with every shape each (negatives
    that differ only in the shape, which the model must see to learn shapes as well as colours), the
    rest drawn at random from the combinations not taken."""
    pairs = list(itertools.product(S.COLORS, S.BACKGROUNDS))
    groups = [pairs[int(i)] for i in rng.choice(len(pairs), size=min(shape_groups, len(pairs)), replace=False)]
    chosen = [S.Attrs(s, c, b) for c, b in groups for s in S.SHAPES][:batch_size]
    taken = set(chosen)
    rest = [a for a in ALL_ATTRS if a not in taken]
    extra = rng.choice(len(rest), size=min(batch_size - len(chosen), len(rest)), replace=False)
    return chosen + [rest[int(i)] for i in extra]


def make_batch(rng: np.random.Generator, batch_size: int, preprocess, tokenizer, shape_groups: int, short: float):
    """Images, tokenised captions and the batch's match matrix (image i, caption j): 1 where caption j
    describes image i. Full captions name shape, colour and background, which are distinct within a
    batch, so they match only their own image; short captions match every image they describe."""
    attrs = batch_attrs(rng, batch_size, shape_groups)
    images, captions, constraints = [], [], []
    for a in attrs:
        w, h = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
        images.append(preprocess(S.render(a, rng, w, h)))
        if rng.random() < short:
            text, constrains = short_caption(a, rng)
        else:
            lang = S.LANGUAGES[int(rng.integers(len(S.LANGUAGES)))]
            text, constrains = S.caption(a, lang, rng), ("shape", "color", "background")
        captions.append(text)
        constraints.append(constrains)
    match = torch.tensor(
        [
            [all(getattr(img, k) == getattr(cap, k) for k in keys) for cap, keys in zip(attrs, constraints)]
            for img in attrs
        ],
        dtype=torch.float32,
    )
    return torch.stack(images), tokenizer(captions), match


def multi_positive_clip_loss(image_features, text_features, logit_scale, match):
    """open_clip's ClipLoss (symmetric cross-entropy over the batch's similarities) with soft targets:
    each image's target spreads evenly over the captions that describe it, each caption's over the
    images it describes. With a diagonal match matrix it is ClipLoss exactly."""
    logits = logit_scale * image_features @ text_features.T
    per_image = match / match.sum(dim=1, keepdim=True)
    per_text = match.T / match.T.sum(dim=1, keepdim=True)
    return (
        torch.nn.functional.cross_entropy(logits, per_image) + torch.nn.functional.cross_entropy(logits.T, per_text)
    ) / 2


def eval_pairs(n: int, seed: int):
    """n images, each with a matched and a mismatched caption in the same (random) language."""
    rng = np.random.default_rng(seed)
    images, pos, neg, kinds, shapes = [], [], [], [], []
    for _ in range(n):
        a = S.random_attrs(rng)
        w, h = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
        images.append(S.render(a, rng, w, h))
        shapes.append(a.shape)
        lang = S.LANGUAGES[int(rng.integers(len(S.LANGUAGES)))]
        pos.append(S.caption(a, lang, rng))
        b = S.mismatched_attrs(a, rng)
        neg.append(S.caption(b, lang, rng))
        kinds.append(
            "both" if (a.shape != b.shape and a.color != b.color) else ("shape" if a.shape != b.shape else "color")
        )
    return images, pos, neg, kinds, shapes


@torch.inference_mode()
def held_out_auc(model, preprocess, tokenizer, n: int = 600, seed: int = EVAL_SEED) -> dict:
    """ROC-AUC of matched vs mismatched captions, overall and by what the mismatch changed."""
    model.eval()
    images, pos, neg, kinds, shapes = eval_pairs(n, seed)
    x = torch.stack([preprocess(im) for im in images])
    fi = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
    fp = torch.nn.functional.normalize(model.encode_text(tokenizer(pos)).float(), dim=-1)
    fn = torch.nn.functional.normalize(model.encode_text(tokenizer(neg)).float(), dim=-1)
    sp, sn = (fi * fp).sum(-1).numpy(), (fi * fn).sum(-1).numpy()
    kinds = np.array(kinds)
    out = {"held_out_auc": round(roc_auc(sp, sn), 4)}
    for k in ("shape", "color", "both"):
        out[f"auc_{k}_mismatch"] = round(roc_auc(sp, sn[kinds == k]), 4)
    out.update(mean_matched=round(float(sp.mean()), 4), mean_mismatched=round(float(sn.mean()), 4))
    out.update(concept_auc(model, preprocess, tokenizer, fi, np.array(shapes)))
    return out


@torch.inference_mode()
def concept_auc(model, preprocess, tokenizer, image_features, shapes: np.ndarray) -> dict:
    """Each shape as a concept, the way curate's concepts score it (tests/test_concepts.py): prompt
    "a <shape>" against the other shapes' prompts, softmax mass at the model's logit scale. The
    worst shape's ROC-AUC against what the held-out images show, and its shares tagged at mass >= 0.5."""
    prompts = tokenizer([f"a {s}" for s in S.SHAPES])
    ft = torch.nn.functional.normalize(model.encode_text(prompts).float(), dim=-1)
    mass = torch.softmax(model.logit_scale.exp() * image_features @ ft.T, dim=1).numpy()
    per = {}
    for k, shape in enumerate(S.SHAPES):
        truly = shapes == shape
        per[shape] = (
            roc_auc(mass[truly, k], mass[~truly, k]),
            (mass[truly, k] >= 0.5).mean(),
            (mass[~truly, k] >= 0.5).mean(),
        )
    worst = min(per, key=lambda s: per[s][0])
    auc, hit, false_hit = per[worst]
    return {
        "shape_concept_auc_min": round(auc, 4),
        "shape_concept_worst": worst,
        "shape_concept_hit": round(float(hit), 3),
        "shape_concept_false_hit": round(float(false_hit), 3),
        "shape_concept_auc": {s: round(v[0], 3) for s, v in per.items()},
    }


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # as open_clip's trainer: no decay on gains, biases, embeddings-as-vectors and logit_scale
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="report held-out AUC every N steps (0: only at the end)")
    ap.add_argument(
        "--shape-groups", type=int, default=18, help="(colour, background) pairs per batch with every shape"
    )
    ap.add_argument("--short", type=float, default=0.25, help="share of captions that are short English prompts")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint (experiments; default: random)")
    ap.add_argument("--out", type=Path, default=ASSETS / f"{MODEL}.safetensors")
    args = ap.parse_args(argv)
    if args.seed == EVAL_SEED:
        ap.error(f"--seed {EVAL_SEED} is the held-out evaluation seed")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    open_clip.add_model_config(ASSETS)

    # random init (no download) unless --init names a checkpoint
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL, pretrained=str(args.init) if args.init else None
    )
    tokenizer = open_clip.get_tokenizer(MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL}: {n_params / 1e6:.2f}M parameters; {args.steps} steps x batch {args.batch_size}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    t0 = time.time()
    data_s = 0.0
    model.train()
    for step in range(args.steps):
        td = time.time()
        images, texts, match = make_batch(rng, args.batch_size, preprocess, tokenizer, args.shape_groups, args.short)
        data_s += time.time() - td
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        image_features, text_features, logit_scale = model(images, texts)
        loss = multi_positive_clip_loss(image_features, text_features, logit_scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  scale {logit_scale.item():6.2f}  "
                f"lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s (data {data_s:.1f}s)",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"  {held_out_auc(model, preprocess, tokenizer, n=300)}", flush=True)
            model.train()
    train_s = time.time() - t0

    model.eval()
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": MODEL,
        "steps": str(args.steps),
        "batch_size": str(args.batch_size),
        "seed": str(args.seed),
        "languages": ",".join(S.LANGUAGES),
        "dtype": "float16",
        "train_seconds": f"{train_s:.0f}",
    }
    save_file(state, str(args.out), metadata=meta)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) after {train_s:.0f}s of training", flush=True)

    # reload through the same path as any real checkpoint, then evaluate on held-out pairs
    reloaded, _, pre = open_clip.create_model_and_transforms(MODEL, pretrained=str(args.out))
    result = held_out_auc(reloaded, pre, tokenizer, n=600)
    result.update(eval_seed=EVAL_SEED, eval_pairs=600, train_seconds=round(train_s, 1), checkpoint_bytes=size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
