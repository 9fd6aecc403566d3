#!/usr/bin/env python
"""Train the bundled tiny CLIP model (curate/assets/curate-tiny.json) on synthetic pairs.

    .venv/bin/python scripts/train_small_clip.py [--steps N] [--out PATH]

Images and captions come from curate.demo.synthetic (coloured shapes on coloured backgrounds, captions
in every language of synthetic.LANGUAGES), generated on the fly with fixed seeds. The model is
built by open_clip.create_model_and_transforms("curate-tiny") from the bundled config and trained
with open_clip's own ClipLoss and AdamW. The images go through the model's own eval preprocess
(resize + centre crop + normalise with the model's mean/std): the exact transform scoring uses.

The checkpoint is a safetensors state_dict with floating tensors stored as fp16 (half the bytes;
the 49408-row token embedding dominates). open_clip loads it into the fp32 model unchanged: the
script reloads it through create_model_and_transforms(pretrained=<path>) and reports the held-out
ROC-AUC of that reloaded model, matched vs mismatched captions, on pairs from a seed not used in
training.
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
from open_clip.loss import ClipLoss  # noqa: E402
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


def make_batch(rng: np.random.Generator, batch_size: int, preprocess, tokenizer):
    # distinct attributes within a batch: no false negatives for the contrastive loss
    idx = rng.choice(len(ALL_ATTRS), size=batch_size, replace=len(ALL_ATTRS) < batch_size)
    images, captions = [], []
    for i in idx:
        a = ALL_ATTRS[int(i)]
        w, h = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
        images.append(preprocess(S.render(a, rng, w, h)))
        lang = S.LANGUAGES[int(rng.integers(len(S.LANGUAGES)))]
        captions.append(S.caption(a, lang, rng))
    return torch.stack(images), tokenizer(captions)


def eval_pairs(n: int, seed: int):
    """n images, each with a matched and a mismatched caption in the same (random) language."""
    rng = np.random.default_rng(seed)
    images, pos, neg, kinds = [], [], [], []
    for _ in range(n):
        a = S.random_attrs(rng)
        w, h = TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))]
        images.append(S.render(a, rng, w, h))
        lang = S.LANGUAGES[int(rng.integers(len(S.LANGUAGES)))]
        pos.append(S.caption(a, lang, rng))
        b = S.mismatched_attrs(a, rng)
        neg.append(S.caption(b, lang, rng))
        kinds.append(
            "both" if (a.shape != b.shape and a.color != b.color) else ("shape" if a.shape != b.shape else "color")
        )
    return images, pos, neg, kinds


@torch.inference_mode()
def held_out_auc(model, preprocess, tokenizer, n: int = 600, seed: int = EVAL_SEED) -> dict:
    """ROC-AUC of matched vs mismatched captions, overall and by what the mismatch changed."""
    model.eval()
    images, pos, neg, kinds = eval_pairs(n, seed)
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
    return out


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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="report held-out AUC every N steps (0: only at the end)")
    ap.add_argument("--out", type=Path, default=ASSETS / f"{MODEL}.safetensors")
    args = ap.parse_args(argv)
    if args.seed == EVAL_SEED:
        ap.error(f"--seed {EVAL_SEED} is the held-out evaluation seed")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    open_clip.add_model_config(ASSETS)

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)  # random init, no download
    tokenizer = open_clip.get_tokenizer(MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL}: {n_params / 1e6:.2f}M parameters; {args.steps} steps x batch {args.batch_size}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

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
        images, texts = make_batch(rng, args.batch_size, preprocess, tokenizer)
        data_s += time.time() - td
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
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
