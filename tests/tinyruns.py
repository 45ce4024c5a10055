"""Whole runs of the tiny model with every random draw injected (x_T, per-step noise, posterior noise), so two
paths (a fast path and the plain one, 8-bit weights and float ones) see the same numbers and may differ only by
what they change. Shared by test_fast_paths.py and test_weight_storage.py."""
from __future__ import annotations

import torch

from dc_app.pipeline import run_synthesis

STEPS = 10
NOISE_SHAPE = (1, 4, 4, 8, 8)  # tiny model: b, latent channels, 4 frames, 8x8 latents (64x64 pixels)
RUN_ARGS = dict(ddim_steps=STEPS, ddim_eta=1.0, unconditional_guidance_scale=7.5, guidance_rescale=0.7, fs=24,
                timestep_spacing="uniform_trailing")


def injected_draws() -> dict[str, torch.Tensor]:
    """Input video and every random draw of a run, from one seeded generator; "variance_noise_other" is another
    draw of the step noise (another sample of the same request), the yardstick for "a different video"."""
    g = torch.Generator().manual_seed(1)
    return {
        "video": torch.rand(1, 3, 4, 64, 64, generator=g) * 2 - 1,
        "x_T": torch.randn(NOISE_SHAPE, generator=g),
        "variance_noise": torch.randn(STEPS, *NOISE_SHAPE, generator=g),
        "variance_noise_other": torch.randn(STEPS, *NOISE_SHAPE, generator=g),
        "posterior_noise": torch.randn(4, 4, 8, 8, generator=g),
    }


def synthesize(model, draws, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latent, decoded video) of a fixed-sampler run with all noise injected."""
    latents = []
    args = dict(RUN_ARGS, x_T=draws["x_T"], variance_noise=draws["variance_noise"],
                posterior_noise=draws["posterior_noise"], callback=lambda i, n, x, p: latents.append(x.clone()))
    args.update(overrides)
    result = run_synthesis(model, "fixed", ["a cat playing piano"], draws["video"], NOISE_SHAPE, **args)
    assert len(latents) == STEPS
    return latents[-1], result.videos


def unet_inputs(batch: int = 2) -> tuple:
    """(x, t, cond, fs) for one tiny-UNet call: t = 999 and 400, a per-frame image context."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 4, 8, 8, generator=g)
    concat = torch.randn(batch, 4, 4, 8, 8, generator=g)
    context = torch.randn(batch, 77 + 16 * 4, 64, generator=g)  # text + 16 image tokens per frame
    cond = {"c_concat": [concat], "c_crossattn": [context]}
    return x, torch.tensor([999, 400][:batch]), cond, torch.tensor([24, 10][:batch])


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
