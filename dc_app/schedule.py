"""The DDIM schedule: upstream's (stock) arithmetic and the fixed arithmetic side by side.

Everything here is computed in float64 first; what a model stores is the float32 cast of these values. The
betas live in dc_app/betas.py and the timestep grids in dc_app/step_grids.py; both are re-exported here,
where upstream's code keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from .betas import dynamic_rescale_table, linear_betas, model_betas, rescale_zero_terminal_snr
from .step_grids import ddim_timesteps, grid_timesteps, repair_timesteps
from .stock_failure import StockIndexError, StockTypeError

__all__ = [
    "DDIMSchedule", "DDPMTables", "config_tables", "ddim_timesteps", "dynamic_rescale_table", "fixed_ddim_schedule",
    "grid_timesteps", "linear_betas", "model_betas", "repair_timesteps", "rescale_zero_terminal_snr",
    "stock_ddim_schedule",
]

# =========================================================================================================
# DDIM schedules.
#
# Notation (DDIM paper, arXiv:2010.02502): the sampler runs n steps over DDPM timesteps tau_0 < ... < tau_{n-1}.
# DDIM index k = 0 is the least noisy step. alpha_k = alpha_bar[tau_k] (the paper's alpha is DDPM's alpha_bar),
# alpha_prev_k = alpha_bar[tau_{k-1}], and eq. (16):
#     sigma_k = eta * sqrt((1 - alpha_prev_k) / (1 - alpha_k)) * sqrt(1 - alpha_k / alpha_prev_k)
# One step (eq. 12):
#     x_prev = sqrt(alpha_prev_k) * pred_x0 + sqrt(1 - alpha_prev_k - sigma_k^2) * eps + sigma_k * noise
#
# `stock_ddim_schedule` is upstream DynamiCrafter's arithmetic, quirks and failures included, dtype for dtype.
# `fixed_ddim_schedule` is the same arithmetic with exactly three repairs, marked REPAIR (1), (2), (3):
#   (1) the square-root argument 1 - alpha_prev - sigma^2 is clamped at 0;
#   (2) timesteps outside 0..N-1 (1000 under "uniform", -1 under "uniform_trailing") are replaced by valid,
#       distinct ones; every valid stock timestep is kept;
#   (3) the values come from the config's float64 betas cast to float32, never from a model's buffers, which
#       may have been cast to float16 / bfloat16.
# docs/nan-fix.md gives the numbers behind every guard.
# =========================================================================================================

def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of a CPU tensor, in its own dtype (NaN for negative values).

    torch's vectorised CPU sqrt is not correctly rounded in every build (torch 2.14 AVX-512: float32 results
    1 ulp off for ~20% of inputs, float64 for ~1.4%), while upstream's numpy calls and the step's per-sample
    sqrt on a (b, 1, 1, 1, 1) tensor are. numpy's is, so every square root of a schedule goes through it.
    """
    with np.errstate(invalid="ignore"):
        return torch.from_numpy(np.sqrt(values.detach().cpu().numpy()))


@dataclass(frozen=True)
class DDPMTables:
    """Per-timestep tables a sampler reads: the model's buffers (stock) or the config's values (fixed)."""

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    scale_arr: Optional[torch.Tensor] = None  # dynamic rescale table (1400 entries), None when unused


@lru_cache(maxsize=16)
def config_tables(
    linear_start: float,
    linear_end: float,
    num_timesteps: int,
    zero_snr: bool,
    base_scale: Optional[float] = None,
) -> DDPMTables:
    """REPAIR (3)'s source: the tables a float32 model holds, recomputed from the config in float64 and cast.

    Bit-identical to upstream's float32 buffers: alpha_bar = cumprod(1 - betas) in float64, square roots taken
    in float64 (numpy's, as upstream's), then each cast to float32 once. Cached; treat the tensors as read-only.
    """
    betas = model_betas(linear_start, linear_end, num_timesteps, zero_snr)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    scale = None if base_scale is None else dynamic_rescale_table(base_scale, num_timesteps).to(torch.float32)
    return DDPMTables(
        alphas_cumprod=alphas_cumprod.to(torch.float32),
        sqrt_alphas_cumprod=_sqrt(alphas_cumprod).to(torch.float32),
        sqrt_one_minus_alphas_cumprod=_sqrt(1.0 - alphas_cumprod).to(torch.float32),
        scale_arr=scale,
    )


@dataclass(frozen=True)
class DDIMSchedule:
    """Everything one DDIM run needs, indexed by DDIM index k (0 = least noisy); the loop goes k = n-1 .. 0.

    Upstream's `make_schedule` arrays, with its dtypes: `sigmas`, `alphas_prev` float64 (the table's dtype when
    n = 1), `alphas`, `sqrt_one_minus_alphas` in the table's dtype. `sqrt_arg` is 1 - alpha_prev - sigma^2 as
    the step evaluates it (float32), after REPAIR (1) for the fixed schedule.

    The step's coefficients, float32 like upstream's torch.full scalars: `sqrt_alphas`, `sqrt_alphas_prev`,
    `sqrt_one_minus_alphas32`, `sigmas32`, `dir_coef` = sqrt(sqrt_arg) (NaN where sqrt_arg < 0), and
    `scale_ratio` = scale_arr[tau_{k-1}] / scale_arr[tau_k] (1 at k = 0; None without dynamic rescale).
    `sqrt_alphas_cumprod_t`, `sqrt_one_minus_alphas_cumprod_t` are the v-conversion factors gathered at each
    timestep, in the table's dtype (upstream multiplies the buffers as they are).
    """

    spacing: str
    num_steps: int                     # S as requested
    eta: float
    fixed: bool
    timesteps: torch.Tensor            # int64 (n,), ascending; n may be S + 1
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    sqrt_arg: torch.Tensor
    sqrt_alphas: torch.Tensor
    sqrt_alphas_prev: torch.Tensor
    sqrt_one_minus_alphas32: torch.Tensor
    sigmas32: torch.Tensor
    dir_coef: torch.Tensor
    sqrt_alphas_cumprod_t: torch.Tensor
    sqrt_one_minus_alphas_cumprod_t: torch.Tensor
    scale_ratio: Optional[torch.Tensor]


def _ddim_parameters(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float) -> dict:
    """Upstream's `make_ddim_sampling_parameters` and the step's float32 scalars, dtype for dtype.

    Shared by both schedules. Timesteps must be < N here (stock checks before); -1 wraps to N-1, as
    upstream's indexing does.
    """
    # 1. alpha_k = alpha_bar[tau_k], in the table's dtype (upstream: a float32, or float16, torch tensor).
    alphas = alphas_cumprod[timesteps]
    # 2. alpha_prev_0 = alpha_bar[0] (not 1: upstream's quirk, kept by both), alpha_prev_k = alpha_bar[tau_{k-1}].
    #    Upstream builds it with np.asarray([tensor] + floats): float64, but in the table's dtype when S gives
    #    a single step (the list then holds only the tensor), and the sigma arithmetic below follows suit.
    prev_dtype = torch.float64 if timesteps.numel() > 1 else alphas_cumprod.dtype
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas[:-1]]).to(prev_dtype)
    # 3. sigma_k (eq. 16), operation for operation as upstream's numpy/torch mix evaluates it:
    #    (1 - a_prev) / (1 - a_k) is torch's reflected division, i.e. reciprocal of (1 - a_k) in the table's
    #    dtype times the float64 array. After a wrapped -1 timestep of a zero-SNR table alpha_prev = 0, so
    #    1 - alpha_k / alpha_prev is 0/0 = NaN, and eta * NaN stays NaN even at eta = 0.
    ratio = (1 - alphas).reciprocal() * (1 - alphas_prev)
    sigmas = eta * _sqrt(ratio * (1 - alphas / alphas_prev))
    # 4. sqrt(1 - alpha_k) for eps models, in the table's dtype (upstream: np.sqrt of the torch tensor).
    sqrt_one_minus_alphas = _sqrt(1.0 - alphas)
    # 5. The step turns alpha_k, alpha_prev, sigma into float32 scalars (torch.full) and evaluates
    #    1 - alpha_prev - sigma^2 in float32. At tau = N-1 of a zero-SNR schedule with eta = 1 the exact value
    #    is 0 and it rounds to -5.96e-8 for S = 7, 11, 14, ... (float32 buffers): its sqrt is NaN.
    a32, a_prev32, sigma32 = alphas.to(torch.float32), alphas_prev.to(torch.float32), sigmas.to(torch.float32)
    sqrt_arg = 1.0 - a_prev32 - sigma32**2
    return dict(
        alphas=alphas, alphas_prev=alphas_prev, sigmas=sigmas, sqrt_one_minus_alphas=sqrt_one_minus_alphas,
        sqrt_arg=sqrt_arg, alphas32=a32, sigmas32=sigma32,
        sqrt_alphas32=_sqrt(a32), sqrt_alphas_prev32=_sqrt(a_prev32),
        sqrt_one_minus_alphas32=sqrt_one_minus_alphas.to(torch.float32),
    )


def _scale_ratio(scale_arr: Optional[torch.Tensor], timesteps: torch.Tensor) -> Optional[torch.Tensor]:
    """Dynamic rescale: scale_arr[tau_{k-1}] / scale_arr[tau_k], each value a float32 scalar (ratio 1 at k=0)."""
    if scale_arr is None:
        return None
    scale = scale_arr[timesteps]
    scale_prev = torch.cat([scale[:1], scale[:-1]])
    return scale_prev.to(torch.float32) / scale.to(torch.float32)


# ---------------------------------------------------------------------------------------- stock | fixed


def stock_ddim_schedule(
    tables: DDPMTables, spacing: str, num_steps: int, eta: float, num_timesteps: int = 1000
) -> DDIMSchedule:
    """Upstream's `DDIMSampler.make_schedule` on the model's buffers, in whatever dtype they are.

    Raises where upstream raises, with the same exception type: TypeError for bfloat16 buffers (upstream
    converts them to numpy), IndexError when a timestep is N ("uniform" spacing). A -1 timestep is kept
    (indexing wraps it to N-1, as upstream's does); the sampler fails on it later, like upstream.
    """
    ts = ddim_timesteps(spacing, num_steps, num_timesteps)
    # Upstream reads scale_arr[ts] first; its 1400 entries take N, and -1 wraps.
    scale_ratio = _scale_ratio(None if tables.scale_arr is None else tables.scale_arr.cpu(), ts)
    alphas_cumprod = tables.alphas_cumprod.cpu()
    # numpy has no bfloat16: upstream's np.sqrt(alphas_cumprod.cpu()) raises before anything else is computed.
    if alphas_cumprod.dtype not in (torch.float16, torch.float32, torch.float64):
        name = str(alphas_cumprod.dtype).replace("torch.", "")
        raise StockTypeError(
            f"stock DDIM cannot use {name} schedule buffers: upstream's make_schedule converts alphas_cumprod "
            f"to numpy (TypeError: Got unsupported ScalarType {'BFloat16' if name == 'bfloat16' else name})"
        )
    # "uniform" yields timestep N whenever c = N div S divides N - 1 (S = 3, 9, 27, 36, 37, every S >= 501).
    too_big = ts[ts >= num_timesteps]
    if too_big.numel():
        raise StockIndexError(
            f"{spacing} spacing cannot do {int(num_steps)} steps: timestep {int(too_big[0])} is out of range "
            f"0..{num_timesteps - 1}"
        )
    p = _ddim_parameters(alphas_cumprod, ts, eta)
    return DDIMSchedule(
        spacing=spacing, num_steps=int(num_steps), eta=float(eta), fixed=False, timesteps=ts,
        alphas=p["alphas"], alphas_prev=p["alphas_prev"], sigmas=p["sigmas"],
        sqrt_one_minus_alphas=p["sqrt_one_minus_alphas"], sqrt_arg=p["sqrt_arg"],
        sqrt_alphas=p["sqrt_alphas32"], sqrt_alphas_prev=p["sqrt_alphas_prev32"],
        sqrt_one_minus_alphas32=p["sqrt_one_minus_alphas32"], sigmas32=p["sigmas32"],
        dir_coef=_sqrt(p["sqrt_arg"]),  # NaN where the float32 argument went negative
        sqrt_alphas_cumprod_t=tables.sqrt_alphas_cumprod.cpu()[ts],
        sqrt_one_minus_alphas_cumprod_t=tables.sqrt_one_minus_alphas_cumprod.cpu()[ts],
        scale_ratio=scale_ratio,
    )


@lru_cache(maxsize=64)
def fixed_ddim_schedule(
    linear_start: float,
    linear_end: float,
    zero_snr: bool,
    spacing: str,
    num_steps: int,
    eta: float,
    num_timesteps: int = 1000,
    base_scale: Optional[float] = None,
) -> DDIMSchedule:
    """The stock schedule with REPAIRS (1)-(3); `base_scale` None means no dynamic rescale.

    Same arithmetic as stock, so wherever stock is finite on float32 buffers every value is bit-identical.
    A pure function of its arguments, hence cached (the sampler remakes its schedule on every sample() call);
    treat the returned tensors as read-only.
    """
    if not 0.0 <= float(eta) <= 1.0:
        # DDIM's sigma is defined for eta in [0, 1]; beyond 1 the square-root argument is truly negative and
        # clamping it would silently change the method.
        raise ValueError(f"ddim_eta={eta!r}: expected a value in [0, 1]")
    # REPAIR (3): the config's float64 betas cast to float32, whatever dtype the model's buffers have.
    tables = config_tables(float(linear_start), float(linear_end), int(num_timesteps), bool(zero_snr),
                           None if base_scale is None else float(base_scale))
    # REPAIR (2): valid, distinct timesteps; every valid stock timestep kept (upstream's spacings). dc_app's
    # own grids ("logsnr") are valid and distinct by construction.
    ts = grid_timesteps(spacing, num_steps, linear_start, linear_end, num_timesteps, zero_snr)
    p = _ddim_parameters(tables.alphas_cumprod, ts, eta)
    # REPAIR (1): in exact arithmetic 1 - alpha_prev - sigma^2 = (1 - alpha_prev) * (1 - eta^2 * q) with
    # q = (1 - alpha_k / alpha_prev) / (1 - alpha_k) <= 1, so it is >= 0 for eta <= 1, and exactly 0 where
    # alpha_k = 0 and eta = 1 (tau = N-1 of a zero-SNR schedule: upstream's -5.96e-8). A negative float32
    # value is rounding error only, and 0 is the exact answer there.
    sqrt_arg = p["sqrt_arg"].clamp_min(0.0)
    return DDIMSchedule(
        spacing=spacing, num_steps=int(num_steps), eta=float(eta), fixed=True, timesteps=ts,
        alphas=p["alphas"], alphas_prev=p["alphas_prev"], sigmas=p["sigmas"],
        sqrt_one_minus_alphas=p["sqrt_one_minus_alphas"], sqrt_arg=sqrt_arg,
        sqrt_alphas=p["sqrt_alphas32"], sqrt_alphas_prev=p["sqrt_alphas_prev32"],
        sqrt_one_minus_alphas32=p["sqrt_one_minus_alphas32"], sigmas32=p["sigmas32"],
        dir_coef=_sqrt(sqrt_arg),
        sqrt_alphas_cumprod_t=tables.sqrt_alphas_cumprod[ts],
        sqrt_one_minus_alphas_cumprod_t=tables.sqrt_one_minus_alphas_cumprod[ts],
        scale_ratio=_scale_ratio(tables.scale_arr, ts),
    )
