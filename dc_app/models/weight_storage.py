"""8-bit weight storage: Linear and Conv weights kept in 8 bits, upcast per layer when the layer runs.

Issue 14 ("low memory"), item 2. Each weight (out, in, *kernel) is stored as 8-bit codes plus one float32
scale per output channel, chosen so that the channel's largest |w| maps to the format's largest value:

- "fp8":  float8_e4m3fn codes (3 mantissa bits, max 448): relative rounding <= 2^-4 for every weight whose
  code is a normal number, absolute <= 2^-10 * scale below that;
- "int8": symmetric integer codes in [-127, 127] (scale = max|w| / 127): absolute rounding <= scale / 2.

The weight is rebuilt (codes * scale, in float32, rounded once to the compute dtype) every time the layer
reads `self.weight`, through torch.nn.utils.parametrize: every forward stays as written, including dc_app's
own TokenConv1d, TokenConv2d and TemporalConv, which slice `self.weight` themselves. Nothing keeps the
rebuilt tensor, so under no_grad only the running layer's full-precision weight exists at any time.

Storage that survives a later `module.to(dtype)` / `.half()`, which casts every floating tensor (float8
included): the fp8 codes are kept as their uint8 bit patterns and the float32 scales as their int32 bit
patterns, and both are viewed back at use. The compute dtype is an empty floating buffer, so the same
`.to(dtype)` that casts the biases moves the compute dtype with them. `.to(device)` moves all of it.

What `state_dict()` holds afterwards, for each stored layer `L` (biases and norms unchanged):
- `L.parametrizations.weight.original`: the codes, shape of the weight, uint8 (fp8 bit patterns) or int8;
- `L.parametrizations.weight.0.scale`: the scales, (out,) int32 holding float32 bit patterns.
A checkpoint is loaded first, into the ordinary `L.weight`, and stored in 8 bits afterwards.

Memory accounting: codes and scales are buffers (`module.buffers()`, `named_buffers()`), not parameters;
the module's parameters are then its biases, norms and embeddings, all in the compute dtype.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT_STORAGE_KINDS = ("fp8", "int8")

# Layers whose weight is stored in 8 bits (subclasses included: TokenConv1d/2d, TemporalConv).
STORED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127  # symmetric: -128 is never used, so +-max|w| are both exact


class WeightStorageUnsupported(ValueError):
    """8-bit weight storage cannot be used as asked (unknown kind, torch build or device without float8)."""


def float8_dtype() -> torch.dtype:
    """torch.float8_e4m3fn, or WeightStorageUnsupported naming what to do when this torch build lacks it."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise WeightStorageUnsupported(
            f"fp8 weight storage needs torch.float8_e4m3fn, which torch {torch.__version__} does not have: "
            "use int8 weight storage (--weights-dtype int8), or install torch >= 2.1"
        )
    return dtype


def check_weight_storage(kind: str, device: torch.device | str = "cpu") -> None:
    """Raise WeightStorageUnsupported unless `kind` can be stored and upcast on `device`.

    fp8 is probed with a tiny tensor on the device (a conversion both ways), since a torch build may know the
    dtype while a device backend cannot convert it (e.g. Apple MPS).
    """
    if kind not in WEIGHT_STORAGE_KINDS:
        raise WeightStorageUnsupported(
            f"unknown weight storage {kind!r}: choose one of {', '.join(WEIGHT_STORAGE_KINDS)}"
        )
    if kind != "fp8":
        return  # int8 -> float conversion exists on every device torch supports
    fp8 = float8_dtype()
    try:
        probe = torch.tensor([1.5, -0.25], device=device).to(fp8)
        ok = torch.equal(probe.view(torch.uint8).view(fp8).float().cpu(), torch.tensor([1.5, -0.25]))
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise WeightStorageUnsupported(
            f"fp8 weight storage: device {device} cannot convert float8_e4m3fn ({err}); "
            "use int8 weight storage (--weights-dtype int8) instead"
        ) from err
    if not ok:
        raise WeightStorageUnsupported(
            f"fp8 weight storage: device {device} converts float8_e4m3fn wrongly; "
            "use int8 weight storage (--weights-dtype int8) instead"
        )


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, ...) -> (8-bit codes of the same shape, float32 scales (out,)); codes * scale ~ weight.

    fp8 codes come back as float8_e4m3fn, int8 codes as int8. An all-zero channel gets scale 1 (codes 0).
    """
    w = weight.detach().float()
    amax = w.abs().flatten(1).amax(dim=1)  # (out,)
    top = FP8_MAX if kind == "fp8" else float(INT8_MAX)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = w / scale.view(-1, *[1] * (w.dim() - 1))
    if kind == "fp8":
        # Dividing by amax / 448 can land a hair above 448, which float8_e4m3fn (no infinity) turns into NaN.
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(float8_dtype())
    else:
        codes = scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


class Dequantize8bit(nn.Module):
    """Parametrization of a stored weight: codes -> codes * per-output-channel scale, in the compute dtype."""

    def __init__(self, kind: str, scale: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.kind = kind
        # float32 bit patterns: module.to(dtype) casts floating buffers only, so the scale stays float32.
        self.register_buffer("scale", scale.float().contiguous().view(torch.int32))
        # Empty and floating on purpose: module.to(dtype) casts it together with the biases, which is how
        # the weight follows a later .to(torch.bfloat16) or .half(). Zero bytes, not in the state dict.
        self.register_buffer("compute", torch.empty(0, dtype=compute_dtype), persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        values = codes.view(float8_dtype()) if self.kind == "fp8" else codes
        scale = self.scale.view(torch.float32).view(-1, *[1] * (codes.dim() - 1))  # (out, 1, ...)
        return (values.float() * scale).to(self.compute.dtype)  # float32 product, rounded once

    def extra_repr(self) -> str:
        return f"kind={self.kind}, compute={self.compute.dtype}"


def store_weights_8bit(module: nn.Module, kind: str, device: torch.device | str | None = None) -> nn.Module:
    """Store every Linear and Conv1d/2d/3d weight inside `module` in 8 bits (`kind`: "fp8" or "int8"), in place.

    The compute dtype of each layer is its weight's dtype now (call after set_dtype); biases and norms are
    left alone. Layers are converted one at a time and each full-precision weight is dropped as soon as its
    codes exist, so the peak is the model plus one layer, never the model twice (the float weight's memory
    is freed only if nothing else holds it). `device`: where the model will run, probed for fp8 support
    (default: where `module` is now). Returns `module`. See the module docstring for the state dict.
    """
    check_weight_storage(kind, device if device is not None else _device_of(module))
    layers = [m for m in module.modules() if isinstance(m, STORED_LAYERS)]
    for layer in layers:
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"{type(layer).__name__}: its weight is already parametrized (stored twice?)")
        weight = layer.weight
        codes, scale = quantize(weight, kind)
        if kind == "fp8":
            codes = codes.view(torch.uint8)  # bit patterns: see the module docstring
        del layer.weight  # drop the Parameter (the last reference, unless the caller holds one) ...
        layer.register_buffer("weight", codes)  # ... and keep the codes as a buffer in its place
        parametrize.register_parametrization(layer, "weight", Dequantize8bit(kind, scale, weight.dtype), unsafe=True)
        del weight
    return module


def weight_storage_of(layer: nn.Module) -> str | None:
    """"fp8" or "int8" when the layer's weight is stored in 8 bits by store_weights_8bit, else None."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:
        if isinstance(p, Dequantize8bit):
            return p.kind
    return None


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def weight_storage_kind(module: nn.Module) -> str | None:
    """"fp8" or "int8" when store_weights_8bit stored `module`'s weights (say, the UNet), else None."""
    return next((kind for kind in map(weight_storage_of, module.modules()) if kind is not None), None)
