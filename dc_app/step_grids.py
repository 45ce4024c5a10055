"""Step grids: the DDPM timesteps a sampler visits, largest first in the run, stored ascending.

* "uniform", "uniform_trailing": upstream's DDIM timesteps (`ddim_timesteps`, bit for bit, failures
  included), which every dc_app sampler runs after `repair_timesteps` (valid and distinct).
* "logsnr": dc_app's grid for multistep solvers (`logsnr_timesteps`): the first step from t = N-1, then
  steps uniform in log-SNR lambda = log(alpha / sigma) down to the final level, the level of t = 0.

Upstream's two stay in `UPSTREAM_SPACINGS` (what stock and a yaml's `defaults:` accept); `TIMESTEP_SPACINGS`
is every grid dc_app's own samplers accept.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .betas import linear_betas, model_betas
from .loading.spec import UPSTREAM_SPACINGS

TIMESTEP_SPACINGS = UPSTREAM_SPACINGS + ("logsnr",)


def _check_spacing_and_steps(spacing: str, num_steps: int, num_timesteps: int,
                             spacings: tuple[str, ...] = UPSTREAM_SPACINGS) -> None:
    if spacing not in spacings:
        raise ValueError(f"timestep_spacing={spacing!r}: expected one of {', '.join(spacings)}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"ddim_num_steps={num_steps!r}: expected an integer in 1..{num_timesteps}")


def ddim_timesteps(spacing: str, num_steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """Upstream's `make_ddim_timesteps`, bit for bit (numpy float rounding included) -> int64, ascending.

    * "uniform": c = N div S; {0, c, 2c, ... < N} + 1. Returns more than S steps whenever c does not divide
      N evenly (S = 7 -> 8 steps), and its last timestep is N (invalid) whenever c divides N - 1.
    * "uniform_trailing": c = N / S; round(arange(N, 0, -c)) reversed, minus 1, so the last is N - 1. When
      N / c rounds up past S, numpy's arange returns one extra element ~0 and the first timestep is -1.
    Neither is repaired here; see `repair_timesteps`.
    """
    _check_spacing_and_steps(spacing, num_steps, num_timesteps)
    num_steps = int(num_steps)
    if spacing == "uniform":
        c = num_timesteps // num_steps
        steps = np.arange(0, num_timesteps, c, dtype=np.int64) + 1
    else:
        # numpy is used on purpose: the extra element comes from arange's length rule, ceil(N / c), and its
        # values from start + i * ((start - c) - start); torch.arange does neither the same way.
        c = num_timesteps / num_steps
        steps = np.flip(np.round(np.arange(num_timesteps, 0, -c))).astype(np.int64) - 1
    return torch.from_numpy(np.ascontiguousarray(steps))


def repair_timesteps(timesteps: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """REPAIR (2): make every timestep valid (0..N-1) and distinct, keeping every valid stock timestep.

    Valid stock timesteps stay (first occurrence of a repeat), so the number of steps is unchanged, upstream's
    S + 1 steps included. Each invalid timestep (or repeat), in order, becomes the unused valid timestep
    nearest to it (ties: the smaller); the result is sorted ascending. In practice:
    "uniform" 1000 -> 999, or -> 0 when 999 is taken (S >= 501 gives 1..1000);
    "uniform_trailing" -1 -> 0, or, when 0 is taken (S >= 769), the smallest timestep the rounding skipped.
    """
    ts = timesteps.detach().cpu().numpy().astype(np.int64)
    if len(ts) > num_timesteps:
        raise ValueError(f"{len(ts)} DDIM steps cannot have distinct timesteps in 0..{num_timesteps - 1}")
    in_range = (ts >= 0) & (ts < num_timesteps)
    if in_range.all() and (np.diff(ts) > 0).all():
        return torch.from_numpy(ts.copy())  # nothing to repair (the usual case)
    keep = np.zeros(len(ts), dtype=bool)
    _, first = np.unique(np.where(in_range, ts, -1), return_index=True)
    keep[first] = True
    keep &= in_range
    free = np.ones(num_timesteps, dtype=bool)
    free[ts[keep]] = False
    out = ts.copy()
    for pos in np.flatnonzero(~keep):
        candidates = np.flatnonzero(free)
        pick = candidates[np.argmin(np.abs(candidates - ts[pos]))]  # first minimum: ties go to the smaller
        free[pick] = False
        out[pos] = pick
    return torch.from_numpy(np.sort(out))


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = (log alpha_bar - log(1 - alpha_bar)) / 2, float64; -inf where alpha_bar = 0."""
    ab = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


@lru_cache(maxsize=64)
def logsnr_timesteps(num_steps: int, linear_start: float, linear_end: float, num_timesteps: int = 1000,
                     zero_snr: bool = False) -> torch.Tensor:
    """The "logsnr" grid: S distinct timesteps, int64 ascending; the run then ends at the level of t = 0.

    Design (measured in docs/samplers.md):
    * The run starts at t = N-1, where x_T is pure noise for a zero-SNR schedule (and nearly so otherwise).
    * Then S - 1 more timesteps whose lambdas are uniform between lambda_lo and lambda(0), the final level,
      which is DDIM's last level (alpha_bar[0]): points lambda_lo + k (lambda(0) - lambda_lo) / S, k = 1..S-1.
      A multistep solver's error is set by its steps in lambda, and uniform steps make every step count.
    * lambda_lo is lambda(N-1) of the config's betas *before* the zero-terminal-SNR rescale (-2.68 for
      DynamiCrafter's linear 0.00085..0.012). For a plain schedule that is its own first level; for a zero-SNR
      schedule it is where the range the model was trained on ends before the rescale stretches it to -inf.
      Below it the zero-SNR levels crowd together (lambda(998) = -7.7, lambda(990) = -5.5) and steps there
      barely move a sample, while a first step landing much higher is a long first-order step.
    * Each lambda is rounded to the timestep in 1..N-1 with the nearest lambda; repeats (many steps, near
      t = 0 where lambda changes fastest) move up to the next free timestep, so the grid is always S distinct
      valid timesteps in the order of their lambdas. t = 0 is only used when S = N needs it: its level is the
      final level already.
    """
    num_steps = int(num_steps)
    _check_spacing_and_steps("logsnr", num_steps, num_timesteps, TIMESTEP_SPACINGS)
    lam = log_snr(torch.cumprod(1.0 - model_betas(linear_start, linear_end, num_timesteps, zero_snr), 0))
    plain_end = log_snr(torch.cumprod(1.0 - linear_betas(linear_start, linear_end, num_timesteps), 0))[-1]
    lam_lo, lam_hi = float(plain_end), float(lam[0])
    targets = lam_lo + (lam_hi - lam_lo) * torch.arange(1, num_steps, dtype=torch.float64) / num_steps
    # Nearest timestep by lambda among 1..N-1 (lambda falls as t rises): search the rising, flipped table.
    rising = lam[1:].flip(0)                         # rising[j] = lambda(N-1-j)
    hi = torch.searchsorted(rising, targets).clamp(1, len(rising) - 1)
    closer_low = (targets - rising[hi - 1]).abs() <= (rising[hi] - targets).abs()
    j = torch.where(closer_low, hi - 1, hi)
    ts = (num_timesteps - 1 - j).tolist()
    chosen = torch.tensor([num_timesteps - 1] + ts, dtype=torch.int64).sort().values
    return _strictly_increasing(chosen, num_timesteps)


def _strictly_increasing(ts: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Sorted timesteps -> distinct ones in 0..N-1, each moved as little as the order allows.

    Repeats are pushed up to the next free timestep (t_k >= t_{k-1} + 1: k + cummax(t_j - j)), then capped from
    the top so that the last stays N-1 and there is room for every step (t_k <= N - S + k). Both bounds rise by
    at least 1 per step, so their minimum does too. Vectorised: S = 1..1000 grids take milliseconds.
    """
    k = torch.arange(len(ts), dtype=torch.int64)
    pushed = k + torch.cummax(ts - k, dim=0).values
    return torch.minimum(pushed, num_timesteps - len(ts) + k)

def grid_timesteps(spacing: str, num_steps: int, linear_start: float, linear_end: float, num_timesteps: int = 1000,
                   zero_snr: bool = False) -> torch.Tensor:
    """The timesteps dc_app's samplers run for `spacing` (any of TIMESTEP_SPACINGS): valid, distinct, ascending.

    Upstream's spacings are repaired (S + 1 steps kept where upstream runs them); "logsnr" is built valid.
    """
    _check_spacing_and_steps(spacing, num_steps, num_timesteps, TIMESTEP_SPACINGS)
    if spacing == "logsnr":
        return logsnr_timesteps(int(num_steps), float(linear_start), float(linear_end), int(num_timesteps),
                                bool(zero_snr)).clone()
    return repair_timesteps(ddim_timesteps(spacing, num_steps, num_timesteps), num_timesteps)
