"""Live tensor bytes during a computation, counted op by op: the memory estimate's measuring tape.

`MemoryTrace` is a TorchDispatchMode. Every aten op's outputs pass through it; it counts each new storage once
(views and in-place results share their input's storage and add nothing) and subtracts it when the last
tensor that holds it dies (weakref finalizers on the tensors). `peak` is the highest sum of live bytes the
traced block reached, above what existed before it: the activations of a forward, without the weights.

It works on the meta device, where tensors have sizes but no memory, so a model built with
`build_model(cfg, device="meta")` predicts a real model's activations without allocating anything. The one
op that runs differently there is attention: on meta, F.scaled_dot_product_attention falls back to its math
decomposition and materialises the (L x L) scores, which no real device does. `MemoryTrace(device_type=...)`
replaces it, on meta only, by the fused kernel that device would run (its meta implementation gives the
shapes it allocates). Kernel-internal scratch is no op output; the one large case on CPU (oneDNN's reordered
copies in convolutions) is modelled, the rest (cuDNN workspaces, SDPA's per-block buffers) is left to the
estimate's margin.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEVICE_TYPES = ("cuda", "cpu")


class MemoryTrace(TorchDispatchMode):
    """`with MemoryTrace() as trace: model(x)` -> `trace.peak`, `trace.live` (bytes, above the start)."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type {device_type!r}: expected one of {DEVICE_TYPES}")
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage id -> how many live tensors hold it
        self._bytes: dict[int, int] = {}    # storage id -> its bytes
        self._attention = _FusedAttentionOnMeta(device_type)

    def __enter__(self):
        self._attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._attention.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._hold(tensor, inputs)
        self.peak = max(self.peak, self.live + self._scratch(func, args))
        return out

    def _scratch(self, func, args) -> int:
        """Bytes a kernel allocates and frees inside the op, which no output shows: on CPU, oneDNN's
        convolutions with a kernel wider than 1 reorder the input and the weight into its blocked layout
        (measured with torch.profiler: a 3x3 conv peaks at output + input + weight)."""
        if self.device_type == "cpu" and func is torch.ops.aten.convolution.default and args[1][0, 0].numel() > 1:
            return args[0].nbytes + args[1].nbytes
        return 0

    def _hold(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        key = _storage_id(tensor)
        if key not in self._holders:
            if key in inputs:
                return  # a view or an in-place result of a tensor that existed before the trace
            self._holders[key] = 0
            self._bytes[key] = tensor.untyped_storage().nbytes()
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._holders[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.live -= self._bytes.pop(key)


def _storage_id(tensor: torch.Tensor) -> int:
    # The address of the C++ StorageImpl: shared by every view, distinct per allocation, and defined on meta
    # too (where data_ptr() is 0 for every tensor).
    return tensor.untyped_storage()._cdata


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On meta tensors, F.scaled_dot_product_attention -> the fused kernel `device_type` would dispatch to."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            q, k, v = args[:3]
            if set(kwargs) - {"scale"} or len(args) > 3:
                raise NotImplementedError("MemoryTrace models SDPA without mask, dropout or causal flags only")
            return fused_attention_meta(q, k, v, kwargs.get("scale"), self.device_type)
        return func(*args, **kwargs)


def fused_attention_meta(q, k, v, scale, device_type: str) -> torch.Tensor:
    """The output of the fused SDPA kernel `device_type` picks for these inputs, computed on meta: the same
    tensors (output and log-sum-exp) as the real kernel allocates, not the math path's score matrix."""
    aten = torch.ops.aten
    if device_type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[0]
    # CUDA: flash attention takes half precision and head dims up to 256; float32 goes to the
    # memory-efficient kernel. Both keep O(L) extra memory (the log-sum-exp), never the (L x L) scores.
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(q, k, v, None, False, scale=scale)[0]
