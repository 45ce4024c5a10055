"""Stand-in models for the sampler tests: the attributes a sampler reads and a cheap deterministic denoiser."""
from __future__ import annotations

import torch

from dc_app.schedule import config_tables

N = 1000
TINY = dict(linear_start=0.00085, linear_end=0.012, base_scale=0.7)
SHAPE = (4, 2, 4, 4)  # C, T, H, W: latents 1x4x2x4x4


class ModelAttrs:
    """The attributes the samplers read, with schedule buffers as a float32 model holds them, then cast."""

    num_timesteps = N
    device = torch.device("cpu")

    def _init_schedule(self, parameterization: str, zero_snr: bool, dtype: torch.dtype,
                       buffers: dict[str, torch.Tensor] | None = None):
        self.parameterization = parameterization
        self.linear_start, self.linear_end = TINY["linear_start"], TINY["linear_end"]
        self.rescale_betas_zero_snr = zero_snr
        self.use_dynamic_rescale = zero_snr  # 512/1024 have both, 256 neither
        self.base_scale = TINY["base_scale"]
        if buffers is None:
            exact = config_tables(self.linear_start, self.linear_end, N, zero_snr, self.base_scale)
            buffers = {k: getattr(exact, k) for k in
                       ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr")}
        for name, value in buffers.items():
            setattr(self, name, value.to(dtype))  # what model.half() / model.bfloat16() leave


class StandIn(torch.nn.Module, ModelAttrs):
    """A cheap deterministic denoiser: a fixed random channel mix, a time-dependent term, and terms in the
    conditioning. Elementwise per batch row, so batching cond and uncond cannot change a value."""

    def __init__(self, parameterization="v", zero_snr=True, dtype=torch.float32, seed=0):
        super().__init__()
        self._init_schedule(parameterization, zero_snr, dtype)
        g = torch.Generator().manual_seed(seed)
        self.mix = (torch.randn(4, 4, generator=g) / 2).view(1, 4, 4, 1, 1, 1)
        self.bias = torch.randn(1, 4, 1, 1, 1, generator=g) * 0.3
        self.calls = 0
        self.seen_kwargs: list[dict] = []

    def apply_model(self, x, t, cond, **kw):
        self.calls += 1
        self.seen_kwargs.append(kw)
        mixed = (self.mix * x.unsqueeze(1)).sum(2)
        time = torch.sin(t.to(torch.float32) / 137.0).view(-1, 1, 1, 1, 1)
        ctx = cond["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        fs = kw.get("fs")
        fs_term = 0.0 if fs is None else (fs.to(torch.float32) / 100).view(-1, 1, 1, 1, 1)
        return 0.8 * torch.tanh(mixed) + time * self.bias + 0.1 * ctx + 0.05 * cond["c_concat"][0] + fs_term


def conds(b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    concat = torch.randn(b, *SHAPE, generator=g)
    cond = {"c_concat": [concat], "c_crossattn": [torch.randn(b, 5, 8, generator=g)]}
    uncond = {"c_concat": [concat], "c_crossattn": [torch.randn(b, 5, 8, generator=g)]}
    return cond, uncond


def run(sampler, S, eta, spacing, seed=0, b=1, **kw):
    cond, uncond = conds(b)
    kind_kw = dict(unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                   fs=torch.full((b,), 24, dtype=torch.long))
    if sampler.model.parameterization == "v":
        kind_kw["guidance_rescale"] = 0.7
    kind_kw.update(kw)
    return sampler.sample(S, b, SHAPE, conditioning=cond, eta=eta, timestep_spacing=spacing, verbose=False,
                          generator=torch.Generator().manual_seed(seed), **kind_kw)
