"""CLIP model loading: the bundled tiny checkpoint, pretrained tags, local and bucket checkpoints.

Every model, the bundled one included, is built by ``open_clip.create_model_and_transforms(name,
pretrained=<tag or local file>)``: the bundled checkpoint takes the same path a real LAION or
DataComp checkpoint does, so the tests exercise the production code path.

    clip = load_clip("curate-tiny", "bundled")             # curate/assets/curate-tiny.safetensors
    clip = load_clip("ViT-B-32", "laion2b_s34b_b79k")       # an open_clip tag (downloads)
    clip = load_clip("ViT-B-32", "s3://bucket/ckpt.pt")     # fetched once into a local cache
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import fsspec
from safetensors import safe_open

from curate import io
from curate.batchnorm_folding import fold_resnet_batchnorm

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = "curate-tiny"
BUNDLED_CHECKPOINT = ASSETS_DIR / f"{BUNDLED_MODEL}.safetensors"
BUNDLED = "bundled"

PRECISIONS = ("auto", "fp32", "bf16", "bf16-image", "fp16")
# "bf16": open_clip's bf16 (Linear/Conv/attention weights of both towers in bf16, LayerNorm fp32).
# "bf16-image": the image tower entirely in bf16 (weights, LayerNorm, activations), the text tower
#   in fp32. The text tower in bf16 moves scores by up to ~0.02 on LAION captions (fails the
#   precision guard); the image tower in bf16 stays within ~0.01 (a ResNet tower's BatchNorms are
#   folded into its convolutions first: curate/batchnorm_folding.py). With exact dynamic text
#   length the fp32 text tower is the smaller share of the work. This is what "auto" picks on CPUs
#   with native bf16.
_LOW_PRECISION = {"bf16": torch.bfloat16, "bf16-image": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where checkpoints fetched from fsspec URLs are kept: $CURATE_CACHE_DIR, else
    ~/.cache/curate/checkpoints."""
    env = os.environ.get("CURATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "curate" / "checkpoints"


def register_bundled_configs() -> None:
    """Make the model configs in curate/assets known to open_clip. Idempotent: the directory is
    added only while one of its configs is still missing from open_clip's registry."""
    # lazy: open_clip adds ~3.4 s over torch; only building a model needs it (not choose_device & co.)
    import open_clip

    ours = {p.stem for p in ASSETS_DIR.glob("*.json")}
    if ours - set(open_clip.list_models()):
        open_clip.add_model_config(ASSETS_DIR)


def _is_url(s: str) -> bool:
    return "://" in s


def _fetch_to_cache(url: str) -> str:
    """Copy a checkpoint at an fsspec URL (s3://, gs://, https://, memory://, ...) to the local
    cache, once; a cached copy of the same size is reused. Written atomically (temp + rename)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    size = info.get("size")
    name = Path(path).name or "checkpoint"
    dest_dir = cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return str(dest)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb") as src:
            while True:
                chunk = src.read(8 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return str(dest)


def resolve_pretrained(model: str, pretrained: str) -> str:
    """What to pass to open_clip as ``pretrained``.

    "bundled" -> the committed checkpoint (only for curate-tiny); an fsspec URL (s3://...) -> a
    local cached copy; "file://..." -> the local path; anything else (a pretrained tag such as
    "laion2b_s34b_b79k", or a local path) is passed through unchanged.
    """
    if pretrained == BUNDLED:
        if model != BUNDLED_MODEL:
            raise ValueError(f"pretrained='bundled' exists only for model {BUNDLED_MODEL!r}, not {model!r}")
        if not BUNDLED_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"bundled checkpoint missing: {BUNDLED_CHECKPOINT} (train it: python scripts/train_small_clip.py)"
            )
        return str(BUNDLED_CHECKPOINT)
    if pretrained.startswith("file://"):
        return pretrained[len("file://") :]
    if _is_url(pretrained):
        return _fetch_to_cache(pretrained)
    return pretrained


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a checkpoint file (curate.io.sha256_file: streamed, local or bucket)."""
    return io.sha256_file(path)


# Set by curate/ray_adapter.py (GPU_IDS_ENV) in each actor it starts, before the actor's __init__: the GPU ids
# Ray assigned to that actor, comma-separated ("" = none). Unset outside such an actor.
RAY_GPU_IDS_ENV = "CURATE_RAY_GPU_IDS"


def assigned_gpu_ids() -> Optional[list[str]]:
    """The GPUs Ray assigned to this process ([] = none), or None when this is not an actor that
    curate/ray_adapter.py started (the driver, a script, a test)."""
    value = os.environ.get(RAY_GPU_IDS_ENV)
    if value is None:
        return None
    return [x for x in value.split(",") if x.strip()]


def choose_device(gpu_ids: Optional[Sequence[Any]], cuda_available: bool) -> torch.device:
    """Where the model goes when no device is given.

    gpu_ids: the GPUs Ray assigned to this process (`assigned_gpu_ids()`), None outside Ray.
    - Ray assigned GPUs and CUDA works: cuda:0. Ray sets CUDA_VISIBLE_DEVICES to the assigned ids,
      so the first one is device 0 of this process, whatever its id on the machine.
    - Ray assigned none ([]): cpu, even where CUDA works. An actor without a GPU on a GPU node still
      sees every GPU (Ray leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors) and would share
      one with the actor Ray gave it to.
    - Ray assigned GPUs but CUDA does not work (no driver, a CPU-only torch): cpu.
    - Outside Ray: cuda:0 if CUDA works, else cpu.
    """
    if gpu_ids is not None and not gpu_ids:
        return torch.device("cpu")
    return torch.device("cuda:0" if cuda_available else "cpu")


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    if device is None:
        gpu_ids, cuda = assigned_gpu_ids(), torch.cuda.is_available()
        if gpu_ids and not cuda:
            logging.getLogger(__name__).warning(
                "Ray assigned GPU %s to this scorer but torch sees no CUDA device (torch %s, CUDA build %s); "
                "scoring on CPU",
                ",".join(gpu_ids),
                torch.__version__,
                torch.version.cuda,
            )
        return choose_device(gpu_ids, cuda)
    return torch.device(device)


_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (Intel AMX-BF16, or AVX512-BF16 on Intel Cooper
    Lake+/AMD Zen 4+). Elsewhere oneDNN emulates bf16 and it is slower than fp32.
    $CURATE_CPU_BF16=0/1 overrides the detection."""
    env = os.environ.get("CURATE_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    return bool(cpu_flags() & set(_NATIVE_BF16_FLAGS))


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto": fp16 on CUDA; "bf16-image" on a CPU with native bf16 (AMX / AVX512-BF16);
    else fp32. "bf16-image" passes the precision guard (tests/test_score_precision.py: |delta score|
    <= 0.01 for >= 99.9% of pairs, threshold decisions flip for <= 0.5%)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16-image" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device}); use 'bf16' or 'fp32' on CPU")
    return precision


@dataclass
class LoadedClip:
    model: torch.nn.Module  # eval mode, requires_grad False
    preprocess: Callable[[Any], torch.Tensor]  # the eval transform (PIL image -> CHW float tensor)
    tokenizer: Callable[..., torch.Tensor]
    model_name: str
    pretrained: str  # as given: "bundled", a tag, a path or URL
    checkpoint_sha256: Optional[str]  # of the checkpoint file; None for a pretrained tag
    device: torch.device
    precision: str  # resolved: "fp32", "bf16", "bf16-image" or "fp16" (the manifest records it)

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the image tensor must have: the image tower's weight dtype (open_clip casts
        Linear/Conv/attention weights to bf16/fp16 and keeps LayerNorm in fp32; "bf16-image" casts
        the whole image tower)."""
        return _LOW_PRECISION.get(self.precision, torch.float32)

    @property
    def pretrained_label(self) -> str:
        """ "bundled:<sha12>" for the bundled checkpoint, the tag for a tag, else
        "<file name>:<sha12>"."""
        if self.checkpoint_sha256 is None:
            return self.pretrained
        name = BUNDLED if self.pretrained == BUNDLED else Path(self.pretrained.rstrip("/")).name
        return f"{name}:{self.checkpoint_sha256[:12]}"

    @property
    def model_id(self) -> str:
        return f"{self.model_name}/{self.pretrained_label}"

    def autocast(self):
        """Autocast context for CUDA low precision; a no-op on CPU (bf16 there is cast weights)."""
        if self.device.type == "cuda" and self.precision in _LOW_PRECISION:
            return torch.autocast(device_type="cuda", dtype=_LOW_PRECISION[self.precision])
        return contextlib.nullcontext()


def load_clip(
    model_name: str,
    pretrained: str,
    device: Optional[str | torch.device] = None,
    precision: str = "auto",
    threads: Optional[int] = None,
) -> LoadedClip:
    """Load a CLIP model for inference through open_clip.create_model_and_transforms."""
    # lazy: open_clip adds ~3.4 s over torch; only building a model needs it (not choose_device & co.)
    import open_clip

    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        torch.set_num_threads(threads)
    register_bundled_configs()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    path_or_tag = resolve_pretrained(model_name, pretrained)

    is_tag = bool(open_clip.get_pretrained_cfg(model_name, path_or_tag)) and not os.path.isfile(path_or_tag)
    if not is_tag and not os.path.isfile(path_or_tag):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} for {model_name!r} is neither a checkpoint file nor a known tag "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    sha = None if is_tag else checkpoint_sha256(path_or_tag)

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=path_or_tag, device=dev, precision="fp32" if prec == "bf16-image" else prec
    )
    model.eval()
    if prec == "bf16-image":
        fold_resnet_batchnorm(model.visual)  # BatchNorm statistics applied in fp32, before the cast
        model.visual.to(torch.bfloat16)
    model.requires_grad_(False)
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        pretrained=pretrained,
        checkpoint_sha256=sha,
        device=dev,
        precision=prec,
    )


# --- the text tower alone (concept prompts at select time: curate/concepts.py) ----------------------


@dataclass
class TextTower:
    """A CLIP model's text tower and logit scale, built without the image tower: what embedding a
    few prompts needs. Its embeddings equal the whole model's `encode_text(..., normalize=True)`
    (tests/test_concepts.py)."""

    module: torch.nn.Module  # open_clip's TextTransformer (or HF text encoder), fp32, eval mode, on CPU
    tokenizer: Callable[..., torch.Tensor]
    logit_scale: float  # exp of the checkpoint's learned logit_scale: the temperature CLIP's softmax uses
    model_name: str
    pretrained: str
    checkpoint_sha256: Optional[str]

    @property
    def model_id(self) -> str:
        """The same "<model>/<pretrained label>" a scorer of this checkpoint records (LoadedClip.model_id)."""
        return _model_id(self.model_name, self.pretrained, self.checkpoint_sha256)

    def encode(self, texts: Sequence[str]) -> "Any":
        """L2-normalised float32 embeddings (a numpy array, one row per text)."""
        with torch.no_grad():
            x = self.module(self.tokenizer(list(texts)))
            if isinstance(x, tuple):  # output_tokens: (pooled, tokens)
                x = x[0]
            return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


def _model_id(model_name: str, pretrained: str, sha: Optional[str]) -> str:
    """LoadedClip.model_id's form: the tag for a pretrained tag, "<file name or bundled>:<sha12>" for a file."""
    if sha is None:
        return f"{model_name}/{pretrained}"
    name = BUNDLED if pretrained == BUNDLED else Path(pretrained.rstrip("/")).name
    return f"{model_name}/{name}:{sha[:12]}"


def model_id_of(model_name: str, pretrained: str) -> str:
    """The model id a scorer or text tower of this checkpoint reports, without building either: a
    checkpoint file is hashed, a pretrained tag is its own label."""
    path_or_tag = resolve_pretrained(model_name, pretrained)
    sha = checkpoint_sha256(path_or_tag) if os.path.isfile(path_or_tag) else None
    return _model_id(model_name, pretrained, sha)


def _text_state(state: dict[str, torch.Tensor], wanted: Sequence[str], source: str) -> dict[str, torch.Tensor]:
    """The text tower's tensors of a whole-model state dict: CustomTextCLIP keeps them under
    `text.`, CLIP at the top level under the tower's own names."""
    out = {}
    for key in wanted:
        for name in (f"text.{key}", key):
            if name in state:
                out[key] = state[name]
                break
    missing = [k for k in wanted if k not in out]
    if missing:
        raise ValueError(f"{source}: not a CLIP checkpoint of this model: its text tower lacks {missing[:5]}")
    return out


def _read_tensors(path: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint file: a safetensors file is read key by key (the image
    tower's tensors are never read); a torch file is loaded whole and the rest dropped."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            have = set(f.keys())
            return {k: f.get_tensor(k) for k in keys if k in have}
    # lazy: open_clip adds ~3.4 s over torch; only building a model needs it
    import open_clip

    state = open_clip.load_state_dict(path)
    return {k: state[k] for k in keys if k in state}


def load_text_tower(model_name: str, pretrained: str, threads: Optional[int] = None) -> TextTower:
    """Build only the text tower of an open_clip model and load its weights (and the logit scale)
    from the same checkpoint load_clip would use: no image tower is built or read, on the CPU in
    fp32 (a few prompts; the text tower in bf16 moves similarities, see _LOW_PRECISION)."""
    # lazy: open_clip adds ~3.4 s over torch; only building a model needs it
    import open_clip

    if threads is not None:
        torch.set_num_threads(threads)
    register_bundled_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"model {model_name!r}: no open_clip config of that name (the text tower is built from it)")
    path_or_tag = resolve_pretrained(model_name, pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, path_or_tag) if not os.path.isfile(path_or_tag) else {}
    if tag_cfg:
        path, sha = open_clip.download_pretrained(tag_cfg), None
    elif os.path.isfile(path_or_tag):
        path, sha = path_or_tag, checkpoint_sha256(path_or_tag)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} for {model_name!r} is neither a checkpoint file nor a known tag "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    text = open_clip.model._build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False), None)
    wanted = list(text.state_dict())
    tensors = _read_tensors(path, [*wanted, *(f"text.{k}" for k in wanted), "logit_scale"])
    text.load_state_dict(_text_state(tensors, wanted, path), strict=True)
    if "logit_scale" not in tensors:
        raise ValueError(f"{path}: no logit_scale in the checkpoint (CLIP's softmax temperature)")
    text.eval()
    text.requires_grad_(False)
    return TextTower(
        module=text,
        tokenizer=open_clip.get_tokenizer(model_name),
        logit_scale=float(tensors["logit_scale"].float().exp().reshape(-1)[0]),
        model_name=model_name,
        pretrained=pretrained,
        checkpoint_sha256=sha,
    )
