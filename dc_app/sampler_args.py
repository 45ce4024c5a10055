"""Checks of sample()'s arguments shared by every dc_app sampler (upstream's DDIMSampler.sample signature)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

# kwargs of upstream's sample() that only its multiple_cond_cfg branch reads; dc_app drops them.
IGNORED_KWARGS = ("cfg_img", "unconditional_conditioning_img_nonetext")
# upstream sample() options dc_app does not implement; accepted only at their inactive value.
INACTIVE_KWARGS = {"mask": None, "x0": None, "quantize_x0": False, "score_corrector": None,
                   "temperature": 1.0, "noise_dropout": 0.0, "precision": None, "multiple_cond_cfg": False}


def drop_unsupported_kwargs(kwargs: dict) -> dict:
    """Remove upstream's ignored and inactive options from `kwargs` (in place); refuse active ones."""
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    for name, inactive in INACTIVE_KWARGS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if not (value is inactive or (not isinstance(value, torch.Tensor) and value == inactive)):
                raise ValueError(f"{name}={value!r} is not supported by dc_app's samplers (only {inactive!r})")
    return kwargs


def latent_size(batch_size: int, shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) not in (3, 4):
        raise ValueError(f"shape={tuple(shape)}: expected (C, T, H, W) or (C, H, W)")
    return (int(batch_size), *(int(d) for d in shape))


def check_variance_noise(variance_noise: Optional[Union[Sequence[torch.Tensor], torch.Tensor]], n_steps: int,
                         size: tuple[int, ...], grid: str) -> None:
    """`variance_noise[i]` replaces step i's noise draw: one entry of the latent's shape per step run."""
    if variance_noise is None:
        return
    if len(variance_noise) != n_steps:
        raise ValueError(f"variance_noise has {len(variance_noise)} entries but the schedule runs {n_steps} steps ({grid})")
    for i in range(n_steps):
        if tuple(variance_noise[i].shape) != tuple(size):
            raise ValueError(f"variance_noise[{i}] has shape {tuple(variance_noise[i].shape)}, expected {size}")
