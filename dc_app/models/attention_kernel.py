"""The one attention kernel every module calls: PyTorch SDPA, with a plain-math path for tests and debugging.

The backend is chosen once per process (or per block with `attention_backend(...)`), never per call site,
so a parity test can flip every attention in the model at the same time.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    """Select "sdpa" (torch.nn.functional.scaled_dot_product_attention, the default) or "math"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Temporarily switch the attention backend: `with attention_backend("math"): ...`."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims; q (..., Lq, d), k and v (..., Lk, d) -> (..., Lq, d_v).

    scale defaults to d^-1/2. No mask: DynamiCrafter's released configs use none at inference.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., Lq, Lk)
    # Softmax in float32 so half-precision runs cannot overflow the exponentials.
    weights = weights.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)
