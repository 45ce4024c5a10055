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

# CUDA launch grids allow at most 65,535 blocks in their y and z dimensions, and PyTorch's flash and
# memory-efficient SDPA kernels put the leading batch dimension there: a larger batch fails with "invalid
# configuration argument" (pytorch/pytorch#146704, #142228). The temporal attention's batch is b*h*w
# sequences, 2*2*72*128 = 36,864 for the 1024 model at batch 2 with batched CFG, so larger batches or
# resolutions cross it. Batches above MAX_KERNEL_BATCH are split into chunks on the devices listed; both are
# module constants so a CPU test can force the split.
MAX_KERNEL_BATCH = 65535
BATCH_LIMITED_DEVICES = frozenset({"cuda"})


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
    batch = q.shape[0]
    if q.dim() >= 3 and batch > MAX_KERNEL_BATCH and q.device.type in BATCH_LIMITED_DEVICES:
        # Rows of the batch are independent, so chunks give the same result as one call.
        n_chunks = math.ceil(batch / MAX_KERNEL_BATCH)

        def chunks(t: torch.Tensor) -> list[torch.Tensor]:
            # A k or v that broadcasts over q's batch (leading size 1, or fewer dims) goes whole to every chunk.
            return list(t.split(MAX_KERNEL_BATCH)) if t.shape[0] == batch else [t] * n_chunks

        return torch.cat([_attention(qc, kc, vc, scale) for qc, kc, vc in zip(chunks(q), chunks(k), chunks(v))])
    return _attention(q, k, v, scale)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., Lq, Lk)
    # Softmax in float32 so half-precision runs cannot overflow the exponentials.
    weights = weights.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)
