"""DDPM betas as a DynamiCrafter config describes them, in float64, and the dynamic-rescale table.

What a model stores is the float32 cast of these values; every sampler dc_app adds reads them from here.
"""
from __future__ import annotations

import torch


def linear_betas(linear_start: float, linear_end: float, num_timesteps: int) -> torch.Tensor:
    """LDM's "linear" schedule: betas = linspace(sqrt(start), sqrt(end), T)^2, float64."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv:2305.08891).

    Shift sqrt(alpha_bar) so its last value is 0 (zero SNR at t = T-1), rescale it so its first value is
    unchanged, and rebuild the betas. In exact arithmetic the last beta is 1 and alpha_bar[-1] is 0.
    """
    betas = betas.to(torch.float64)
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def model_betas(linear_start: float, linear_end: float, num_timesteps: int, zero_snr: bool) -> torch.Tensor:
    """The float64 betas a DynamiCrafter config describes."""
    betas = linear_betas(linear_start, linear_end, num_timesteps)
    return rescale_zero_terminal_snr(betas) if zero_snr else betas


def dynamic_rescale_table(base_scale: float, num_timesteps: int = 1000, ramp: int = 400) -> torch.Tensor:
    """DynamiCrafter's `scale_arr`: linspace(1, base_scale, 400) then base_scale for 1000 more entries, float64.

    Indexed by timestep; the sampler multiplies pred_x0 by scale_arr[t_prev] / scale_arr[t].
    """
    ramp_part = torch.linspace(1.0, base_scale, ramp, dtype=torch.float64)
    flat_part = torch.full((num_timesteps,), base_scale, dtype=torch.float64)
    return torch.cat([ramp_part, flat_part])
