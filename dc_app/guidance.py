"""Classifier-free guidance as every dc_app sampler applies it: one model output per step from cond and uncond.

Upstream's order of operations, kept by every sampler: CFG on the raw model output (v or eps), then guidance
rescale on that output, and only then the conversion to x0 the sampler needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def rescale_noise_cfg(model_output: torch.Tensor, cond_output: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (arXiv:2305.08891, eq. 15-16), as upstream: match the guided output's std to the
    conditional output's (unbiased std over all non-batch dims), then blend with weight phi."""
    dims = list(range(1, cond_output.ndim))
    std_cond = cond_output.std(dim=dims, keepdim=True)
    std_cfg = model_output.std(dim=dims, keepdim=True)
    rescaled = model_output * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * model_output


def cat_batch(uncond: Any, cond: Any, what: str) -> Any:
    """Concatenate two conditionings of the same structure along the batch (uncond first)."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond], dim=0)
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"{what}: cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {k: cat_batch(uncond[k], cond[k], f"{what}[{k!r}]") for k in cond}
    if isinstance(cond, (list, tuple)):
        if len(cond) != len(uncond):
            raise ValueError(f"{what}: cond has {len(cond)} entries, uncond {len(uncond)}")
        return type(cond)(cat_batch(u, c, f"{what}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is uncond or cond == uncond:
        return cond
    raise ValueError(f"{what}: cannot batch {type(cond).__name__} values that differ between cond and uncond")


@dataclass
class GuidedModel:
    """`model.apply_model` with classifier-free guidance: call it with (x, t) -> the guided model output.

    Guidance runs when `unconditional_conditioning` is given and the scale is not 1: one batched apply_model
    call (uncond and cond concatenated) when `batched`, else two calls, cond first, as upstream. `kwargs` go to
    apply_model; those with a batch dimension are doubled for the batched call.
    """

    model: Any
    conditioning: Any
    unconditional_conditioning: Any = None
    scale: float = 1.0
    guidance_rescale: float = 0.0
    fs: Optional[torch.Tensor] = None
    batched: bool = True
    kwargs: dict = field(default_factory=dict)

    @property
    def uses_cfg(self) -> bool:
        return self.unconditional_conditioning is not None and self.scale != 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        apply = self.model.apply_model
        if not self.uses_cfg:
            return apply(x, t, self.conditioning, fs=self.fs, **self.kwargs)
        if self.batched:
            b = x.shape[0]
            out = apply(
                torch.cat([x, x]), torch.cat([t, t]),
                cat_batch(self.unconditional_conditioning, self.conditioning, "conditioning"),
                fs=_double(self.fs, b),
                **{k: _double(v, b) for k, v in self.kwargs.items()},
            )
            out_uncond, out_cond = out[:b], out[b:]
        else:
            out_cond = apply(x, t, self.conditioning, fs=self.fs, **self.kwargs)
            out_uncond = apply(x, t, self.unconditional_conditioning, fs=self.fs, **self.kwargs)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, out_cond, self.guidance_rescale)
        return guided


def _double(value: Any, batch: int) -> Any:
    """A per-sample tensor repeated for the (uncond, cond) batch; scalars and other values pass unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value])
    return value
