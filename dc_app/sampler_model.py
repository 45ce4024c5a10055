"""What a dc_app sampler needs from a model, as a written interface (DynamiCrafter in dc_app/models/diffusion.py)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SamplerModel(Protocol):
    """The attributes and the one method every sampler reads.

    Every sampler: `apply_model`, `parameterization`, `num_timesteps`, `use_dynamic_rescale`, `device`.
    Stock (upstream's arithmetic) reads the model's schedule buffers, in whatever dtype they were cast to.
    Every other sampler rebuilds the schedule from the config values in float64 and never reads the buffers.
    """

    parameterization: str             # "v" (512, 1024, interp) or "eps" (256)
    num_timesteps: int                # N = 1000 DDPM timesteps
    use_dynamic_rescale: bool         # DynamiCrafter's scale_arr on pred_x0
    device: torch.device
    # config values (dc_app's samplers)
    linear_start: float
    linear_end: float
    rescale_betas_zero_snr: bool
    base_scale: float                 # last value of scale_arr
    # schedule buffers (stock only)
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    scale_arr: torch.Tensor

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs) -> torch.Tensor:
        """The denoiser's raw output (v or eps) for latents x at integer timesteps t (b,)."""
        ...
