"""The two OpenCLIP encoders DynamiCrafter conditions on: text (penultimate layer) and image (all tokens).

Both wrap a plain `open_clip.model.CLIP` built from a model-config dict, never from pretrained weights (the
DynamiCrafter checkpoint carries them), and each keeps only the half it uses, exactly like upstream: the text
embedder drops `visual`, the image embedder drops the text `transformer` but keeps the other text leftovers
(`token_embedding`, `ln_final`, ...) because the checkpoint stores them under `embedder.model.*`.

open_clip's own blocks are called as they are; only the glue around them (embedding, which blocks run, the
image preprocessing) lives here. Works with open_clip 3.x (batch-first transformers) and, for the block
layout, with older sequence-first ones.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

# CLIP's pixel normalisation (OpenAI's dataset statistics, also used by the LAION ViT-H-14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# How many text blocks to skip at the end: "penultimate" drops the last one (what DynamiCrafter uses).
TEXT_LAYERS = {"last": 0, "penultimate": 1}


# ---------------------------------------------------------------------------------------------------------
# Building the open_clip model


def _plain(obj: Any) -> Any:
    """Deep-convert mappings / sequences (e.g. omegaconf containers) to dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def resolve_model_cfg(arch: str, model_cfgs: Mapping[str, Any] | None = None) -> dict:
    """The open_clip model-config dict (embed_dim, vision_cfg, text_cfg) of `arch`.

    Looked up first in `model_cfgs` (a config yaml's `open_clip_model_cfgs` block), then among the configs
    bundled with open_clip. Nothing is ever downloaded: hub/local-dir names are refused.
    """
    if model_cfgs is not None and arch in model_cfgs:
        cfg = _plain(model_cfgs[arch])
    else:
        if ":" in arch:
            raise ValueError(f"open_clip arch {arch!r}: expected a bundled model name (no hf-hub:/local-dir: schema)")
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            known = sorted(model_cfgs) if model_cfgs else []
            raise ValueError(
                f"open_clip arch {arch!r}: not in the config's open_clip_model_cfgs {known} "
                f"nor among open_clip's bundled model configs"
            )
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError(f"open_clip arch {arch!r}: expected a dict with embed_dim, vision_cfg, text_cfg, got {cfg!r}")
    if cfg.get("custom_text") or "multimodal_cfg" in cfg or cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"open_clip arch {arch!r}: expected a plain CLIP text tower (no custom/HF/CoCa text model)")
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"open_clip arch {arch!r}: expected an open_clip VisionTransformer (not timm / ResNet)")
    return cfg


def build_clip(cfg: Mapping[str, Any]) -> open_clip.model.CLIP:
    """An open_clip CLIP from a model-config dict, float32, built on the current default device."""
    cfg = dict(cfg)
    cfg.pop("custom_text", None)  # False here (checked by resolve_model_cfg); not a CLIP argument
    accepted = set(inspect.signature(open_clip.model.CLIP.__init__).parameters) - {"self"}
    unknown = set(cfg) - accepted
    if unknown:
        raise ValueError(f"open_clip model config has keys {sorted(unknown)}: expected only {sorted(accepted)}")
    return open_clip.model.CLIP(**cfg)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Additive (length, length) float32 mask: 0 on and below the diagonal, -inf above (open_clip's layout)."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


def run_blocks(transformer: nn.Module, x: torch.Tensor, n_blocks: int | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the first `n_blocks` resblocks (all when None) of an open_clip Transformer on x (B, L, D).

    We loop over the blocks ourselves (to stop early for the penultimate layer), so we also own the layout:
    open_clip >= 3 blocks are batch-first; older ones want (L, B, D).
    """
    blocks = transformer.resblocks if n_blocks is None else transformer.resblocks[:n_blocks]
    batch_first = getattr(transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, L, D) -> (L, B, D)
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)  # (L, B, D) -> (B, L, D)
    return x


def _first_param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_not_meta(buffer: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    # After a meta-device build + load_state_dict(assign=True) the non-persistent buffers are still on meta.
    if buffer is not None and buffer.is_meta and not x.is_meta:
        raise RuntimeError(f"{name} is on the meta device: call reset_nonpersistent_buffers() after loading weights")


# ---------------------------------------------------------------------------------------------------------
# Text


@functools.lru_cache(maxsize=1)
def _tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    # open_clip's bundled BPE tokenizer (SOT 49406, EOT 49407, zero padding); building it reads the vocab once.
    return open_clip.tokenizer.SimpleTokenizer()


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a string or a list of strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


class OpenCLIPTextEmbedder(nn.Module):
    """Prompts -> (B, context_length, width) text context: every token of a middle text-transformer layer.

    `layer="penultimate"` (DynamiCrafter) runs all resblocks but the last, then `ln_final`; no pooling and
    no projection, so the padding positions are part of the context too. `.model` is an open_clip CLIP
    without `visual`; its state_dict matches upstream's `cond_stage_model.model.*`.
    """

    def __init__(self, arch: str = "ViT-H-14", layer: str = "penultimate",
                 model_cfgs: Mapping[str, Any] | None = None, **ignored: Any):
        super().__init__()
        if layer not in TEXT_LAYERS:
            raise ValueError(f"text layer {layer!r}: expected one of {sorted(TEXT_LAYERS)}")
        self.arch = arch
        self.layer = layer
        model = build_clip(resolve_model_cfg(arch, model_cfgs))
        del model.visual  # the checkpoint has no text-embedder vision weights
        self.model = model
        self.context_length = int(model.context_length)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, context_length) int64 tokens on the CPU; prompts that are too long are cut, EOT kept at the end."""
        return _tokenizer()(_as_prompt_list(prompts), context_length=self.context_length)

    def num_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs, SOT and EOT included (more than context_length means it gets truncated)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        return len(_tokenizer().encode(prompt)) + 2

    def is_truncated(self, prompt: str) -> bool:
        """Whether tokenize() cuts this prompt (the app shows a notice: the model never sees the rest)."""
        return self.num_tokens(prompt) > self.context_length

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) int64 tokens -> (B, context_length, width) in the model's dtype and device."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens: expected (B, {self.context_length}), got {tuple(tokens.shape)}")
        model = self.model
        _check_not_meta(model.attn_mask, model.token_embedding.weight, "text attn_mask")
        x = model.token_embedding(tokens.to(model.token_embedding.weight.device))  # (B, L, width)
        x = x + model.positional_embedding.to(x.dtype)
        n_blocks = len(model.transformer.resblocks) - TEXT_LAYERS[self.layer]
        x = run_blocks(model.transformer, x, n_blocks=n_blocks, attn_mask=model.attn_mask)
        return model.ln_final(x)

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """list of B prompts -> (B, context_length, width) text context."""
        return self.encode_tokens(self.tokenize(prompts))

    def reset_nonpersistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild the causal attention mask (not in the checkpoint) on `device` (default: the weights' device)."""
        device = device if device is not None else _first_param_device(self.model)
        if self.model.attn_mask is not None:
            self.model.attn_mask = causal_mask(self.model.positional_embedding.shape[0], device)


# ---------------------------------------------------------------------------------------------------------
# Image


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised Gaussian taps centred on the middle one; size int(max(4 sigma, 3)) made odd (kornia's rule)."""
    size = int(max(4.0 * sigma, 3.0))
    if size % 2 == 0:
        size += 1
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    sigma_t = torch.tensor(sigma, dtype=dtype, device=device)  # sigma in the data dtype, as kornia computes it
    taps = torch.exp(-x.pow(2) / (2 * sigma_t.pow(2)))
    return taps / taps.sum()


def _filter_axis(x: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Depthwise 1-D correlation of x (B, C, H, W) along H (axis=2) or W (axis=3), reflect-padded to keep size."""
    c, k = x.shape[1], taps.numel()
    pad = k // 2
    if axis == 3:
        weight = taps.reshape(1, 1, 1, k).expand(c, 1, 1, k)  # (C, 1, 1, k): one row filter per channel
        x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    else:
        weight = taps.reshape(1, 1, k, 1).expand(c, 1, k, 1)  # (C, 1, k, 1): one column filter per channel
        x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, weight, groups=c)


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (align_corners=True) resize of x (B, C, H, W) to `size`, reproducing kornia's antialias=True.

    When any side shrinks, the image is first blurred with a separable Gaussian, sigma = max((factor-1)/2,
    0.001) per axis (so a non-shrinking axis gets a numerically exact identity filter), rows first, then
    columns. Upscaling only: no blur. Same size: returned unchanged.
    """
    h, w = x.shape[-2:]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    factors = (h / out_h, w / out_w)
    if max(factors) > 1:
        sigma_h, sigma_w = (max((f - 1.0) / 2.0, 0.001) for f in factors)
        x = _filter_axis(x, _gaussian_kernel1d(sigma_w, x.dtype, x.device), axis=3)
        x = _filter_axis(x, _gaussian_kernel1d(sigma_h, x.dtype, x.device), axis=2)
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=True)


class OpenCLIPImageEmbedder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> (B, 1 + grid^2, width): every token of the vision transformer.

    Class token + patch tokens + positional embedding, ln_pre, all resblocks; no ln_post / proj (DynamiCrafter's
    Resampler consumes the full token grid). `.model` is an open_clip CLIP without the text `transformer`; its
    state_dict matches upstream's `embedder.model.*`, text leftovers included.
    """

    def __init__(self, arch: str = "ViT-H-14", model_cfgs: Mapping[str, Any] | None = None, **ignored: Any):
        super().__init__()
        self.arch = arch
        model = build_clip(resolve_model_cfg(arch, model_cfgs))
        del model.transformer  # the text blocks are not in the checkpoint's embedder weights
        self.model = model
        self.image_size = tuple(int(s) for s in model.visual.image_size)  # (224, 224) for ViT-H-14
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> CLIP input (B, 3, 224, 224), computed in float32, returned in x's dtype.

        Antialiased bicubic resize to the model's square input (aspect ratio not kept, as upstream), then
        [0, 1], then CLIP mean/std.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        _check_not_meta(self.mean, x, "image mean/std")
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # resize + blur in at least float32
        y = antialiased_resize(x.to(compute_dtype), self.image_size)
        y = (y + 1.0) / 2.0
        mean = self.mean.to(device=y.device, dtype=compute_dtype).reshape(1, 3, 1, 1)
        std = self.std.to(device=y.device, dtype=compute_dtype).reshape(1, 3, 1, 1)
        return ((y - mean) / std).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 1 + grid^2, width) tokens in the model's dtype."""
        visual = self.model.visual
        x = self.preprocess(x).to(device=visual.conv1.weight.device, dtype=visual.conv1.weight.dtype)
        x = visual.conv1(x)  # (B, width, grid, grid): non-overlapping patches
        b, width = x.shape[:2]
        x = x.reshape(b, width, -1).transpose(1, 2)  # (B, width, grid^2) -> (B, grid^2, width)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, width).expand(b, 1, width)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + grid^2, width)
        x = x + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # identity in eval mode
        x = visual.ln_pre(x)
        return run_blocks(visual.transformer, x)

    def reset_nonpersistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild mean/std and the (unused) text causal mask on `device` (default: the weights' device)."""
        device = device if device is not None else _first_param_device(self.model)
        self.mean = torch.tensor(CLIP_MEAN, device=device)
        self.std = torch.tensor(CLIP_STD, device=device)
        # The leftover text half still registers open_clip's causal mask; rebuild it so .to() works.
        if getattr(self.model, "attn_mask", None) is not None:
            self.model.attn_mask = causal_mask(self.model.positional_embedding.shape[0], device)
