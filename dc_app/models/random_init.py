"""Deterministic random weights with no zero-initialised layer, for the tiny test model.

Upstream zero-initialises the UNet `out`, every `proj_out`, each ResBlock's last conv and more, so a
freshly built model ignores whole branches. Tests and the CPU demo need every branch live; this is the
recipe the reference tiny weights were drawn with (see tests/data/REFERENCE.md, section 2.2).
"""
from __future__ import annotations

import math

import torch
from torch import nn

_EMBEDDING_NAMES = ("positional_embedding", "class_embedding", "latents")


@torch.no_grad()
def randomize_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter of `model` from a private generator seeded with `seed`; buffers are kept."""
    gen = torch.Generator().manual_seed(seed)
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
        for p in m.parameters(recurse=False)
    }
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        normal = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_params:
            value = 1.0 + 0.1 * normal if leaf == "weight" else 0.1 * normal
        elif id(p) in embedding_weights or leaf in _EMBEDDING_NAMES:
            value = 0.5 * normal
        elif leaf == "bias" or p.dim() < 2:
            value = 0.05 * normal
        else:
            fan_in = math.prod(p.shape[1:])
            value = normal / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return model
