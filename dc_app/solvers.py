"""Multistep ODE/SDE solvers over a denoiser callable and a sequence of noise levels, k-diffusion style.

Every solver here is one small function `sample_x(denoise, x, alphas, sigmas, ...)`:

* `alphas`, `sigmas` (float64, length n + 1) are the levels x passes through, x_i = alpha_i x0 + sigma_i eps:
  level 0 is the level of the input x, level n the level of the output. Nothing else about the schedule is
  needed, so the same function runs on integer DDPM timesteps or on any continuous grid (the order tests).
* `denoise(x, i)` returns the estimate of x0 at level i (i < n).
* `callback(i, x, x0)` runs after step i with the new x and the x0 estimate the step used.

All of them are written in data prediction ("++") form, with the step's exponential factor taken as a ratio
of levels: e^{-h} = (alpha_i sigma_{i+1}) / (sigma_i alpha_{i+1}), h = lambda_{i+1} - lambda_i, lambda =
log(alpha / sigma). A zero-terminal-SNR schedule starts at alpha = 0, where lambda = -inf and h = inf; the
ratio is then exactly 0 and every coefficient stays finite (no inf, no 0/0). A second-order correction needs a
finite previous step, h_{i-1} / h_i; where the previous level has lambda = -inf (the step right after zero SNR)
or a step has length 0 the solver takes a first-order step instead.

The per-step coefficients come from pure functions of the levels (`*_coefficients`), vectorised in float64,
so that their finiteness can be checked for every grid without running a model.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]
NoiseSampler = Callable[[int, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ level geometry


def _as_levels(alphas, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if a.shape != s.shape or a.numel() < 2:
        raise ValueError(f"alphas and sigmas: expected two sequences of the same length >= 2, got {a.shape}, {s.shape}")
    if not (torch.isfinite(a).all() and torch.isfinite(s).all() and (a >= 0).all() and (s > 0).all()):
        raise ValueError("levels: expected finite alphas >= 0 and sigmas > 0")
    return a, s


def step_ratios(alphas, sigmas) -> torch.Tensor:
    """e^{-h_i} of each step, (n,), as the level ratio (alpha_i sigma_{i+1}) / (sigma_i alpha_{i+1}).

    In [0, 1] for a grid of rising log-SNR: exactly 0 for a step from alpha = 0 (h = inf), 1 for a step of
    length 0. sigma > 0 everywhere and alpha_{i+1} > 0 after the first level, so nothing divides by zero.
    """
    a, s = _as_levels(alphas, sigmas)
    if (a[1:] <= 0).any():
        raise ValueError("levels: only the first level may have alpha = 0 (zero SNR)")
    rho = (a[:-1] * s[1:]) / (s[:-1] * a[1:])
    if (rho > 1.0 + 1e-12).any():
        raise ValueError("levels: log-SNR must not decrease from one level to the next")
    return rho.clamp(0.0, 1.0)


def _second_order_ratio(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(usable, r): r_i = h_{i-1} / h_i where both steps have finite, non-zero length; usable marks them."""
    usable = torch.zeros_like(rho, dtype=torch.bool)
    r = torch.ones_like(rho)
    finite_step = (rho > 0) & (rho < 1)  # h in (0, inf)
    usable[1:] = finite_step[1:] & finite_step[:-1]
    # h = -log(rho); only evaluated where both are finite and non-zero.
    h = torch.where(finite_step, -torch.log(torch.where(finite_step, rho, torch.ones_like(rho))), torch.ones_like(rho))
    r[1:] = torch.where(usable[1:], h[:-1] / h[1:], torch.ones_like(rho[1:]))
    return usable, r


# ------------------------------------------------------------------------------------------ coefficients


def dpmpp_2m_sde_coefficients(alphas, sigmas, eta: float = 0.0, second_order: bool = True) -> torch.Tensor:
    """(n, 4) float64: x_{i+1} = c_x x_i + c_0 D_i + c_1 D_{i-1} + c_noise noise_i.

    SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, sec. 5 and app. B), in k-diffusion's form with
    noise scale eta: with rho = e^{-h},
        x_{i+1} = (sigma_{i+1} / sigma_i) rho^eta x_i + alpha_{i+1} (1 - rho^(1 + eta)) D
                  + sigma_{i+1} sqrt(1 - rho^(2 eta)) noise,
    D = D_i + (D_i - D_{i-1}) / (2 r) (second order), D = D_i (first order). eta = 0 is DPM-Solver++(2M);
    eta = 0 without the second order is DDIM (eta 0). rho^eta is a power, so rho = 0 (zero SNR) gives 0 for
    eta > 0 and 1 for eta = 0, as the limits do, with no log(0).
    """
    a, s = _as_levels(alphas, sigmas)
    eta = float(eta)
    if not eta >= 0.0:
        raise ValueError(f"eta={eta!r}: expected a value >= 0")
    rho = step_ratios(a, s)
    c_x = (s[1:] / s[:-1]) * rho.pow(eta)
    gain = a[1:] * (1.0 - rho.pow(1.0 + eta))
    c_noise = s[1:] * (1.0 - rho.pow(2.0 * eta)).clamp_min(0.0).sqrt()
    c_0, c_1 = gain.clone(), torch.zeros_like(gain)
    if second_order:
        usable, r = _second_order_ratio(rho)
        extra = torch.where(usable, gain / (2.0 * r), torch.zeros_like(gain))
        c_0, c_1 = c_0 + extra, -extra
    return torch.stack([c_x, c_0, c_1, c_noise], dim=1)


def unipc_corrector_coefficients(alphas, sigmas) -> torch.Tensor:
    """(n, 4) float64 of UniC (Zhao et al. 2023, arXiv:2302.04867, bh2, order 2), for the point x_{i+1}:

        x_{i+1} <- c_x x_i + c_0 D_i + c_1 D_{i-1} + c_next D_{i+1}

    where x_i is the corrected previous point and D_{i+1} the model's x0 at the predicted x_{i+1} (the call the
    next step needs anyway, so the corrector costs no model call). With A = alpha_{i+1} (1 - rho) and rk =
    -h_{i-1} / h_i, order 2 solves [[1, 1], [rk, 1]] (r0, r1) = (b1, b2) for the phi-function targets b_k of
    B(h) = e^{-h} - 1 (bh2) and gives D_i + r0 (D_{i-1} - D_i) / rk + r1 (D_{i+1} - D_i); order 1 (after a
    zero-SNR level, or the first step) is the trapezoid D_i + (D_{i+1} - D_i) / 2.
    """
    a, s = _as_levels(alphas, sigmas)
    rho = step_ratios(a, s)
    usable, r = _second_order_ratio(rho)
    c_x = s[1:] / s[:-1]
    A = a[1:] * (1.0 - rho)
    # Order-2 targets; h is finite and > 0 wherever `usable`, elsewhere a placeholder 1 keeps them finite.
    h = torch.where(usable, -torch.log(torch.where(usable, rho, torch.full_like(rho, 0.5))), torch.ones_like(rho))
    e = torch.expm1(-h)                         # rho - 1 = B(h), accurate for small h
    phi1 = -e / h - 1.0                         # h_phi_1 / hh - 1 with hh = -h
    phi2 = phi1 / (-h) - 0.5
    b1, b2 = phi1 / e, 2.0 * phi2 / e
    rk = -r
    r0 = (b1 - b2) / (1.0 - rk)
    r1 = b1 - r0
    c_1 = torch.where(usable, A * r0 / rk, torch.zeros_like(A))
    c_next = torch.where(usable, A * r1, 0.5 * A)
    c_0 = A - c_1 - c_next
    return torch.stack([c_x, c_0, c_1, c_next], dim=1)


# ------------------------------------------------------------------------------------------ samplers


def _run_2m(denoise: Denoiser, x: torch.Tensor, coefs: torch.Tensor, callback: StepCallback,
            noise_sampler: Optional[NoiseSampler] = None) -> torch.Tensor:
    old = None
    for i, (c_x, c_0, c_1, c_noise) in enumerate(coefs.tolist()):
        d = denoise(x, i)
        x_next = c_x * x + c_0 * d
        if c_1 != 0.0:
            x_next = x_next + c_1 * old
        if noise_sampler is not None:
            # Drawn at every step (also where c_noise is 0), so the noise of step i never depends on eta.
            x_next = x_next + c_noise * noise_sampler(i, x)
        x, old = x_next, d
        if callback is not None:
            callback(i, x, d)
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, alphas, sigmas, callback: StepCallback = None) -> torch.Tensor:
    """DDIM, eta 0 (Song et al. 2020): first-order DPM-Solver++ (the same step, data prediction form)."""
    return _run_2m(denoise, x, dpmpp_2m_sde_coefficients(alphas, sigmas, 0.0, second_order=False), callback)


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, alphas, sigmas, callback: StepCallback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, alg. 2): deterministic, data prediction."""
    return _run_2m(denoise, x, dpmpp_2m_sde_coefficients(alphas, sigmas, 0.0), callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, alphas, sigmas, eta: float = 1.0,
                        noise_sampler: Optional[NoiseSampler] = None, callback: StepCallback = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022), noise scale eta: 0 is 2M, 1 the full SDE.

    `noise_sampler(i, x)` gives step i's standard normal noise (default: torch.randn_like).
    """
    if noise_sampler is None:
        noise_sampler = lambda i, like: torch.randn_like(like)  # noqa: E731
    return _run_2m(denoise, x, dpmpp_2m_sde_coefficients(alphas, sigmas, eta), callback, noise_sampler)


@torch.no_grad()
def sample_unipc(denoise: Denoiser, x: torch.Tensor, alphas, sigmas, callback: StepCallback = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867), bh2, order 2: UniP-2 predictor and UniC corrector.

    The bh2 order-2 predictor is DPM-Solver++(2M)'s step. Each model call at a predicted point first corrects
    that point (UniC), then feeds the next prediction; the x0 estimate kept for later steps is the one at the
    predicted (uncorrected) point, as in the paper's algorithm. The last point has no model call, so no
    corrector.
    """
    predictor = dpmpp_2m_sde_coefficients(alphas, sigmas, 0.0).tolist()
    corrector = unipc_corrector_coefficients(alphas, sigmas).tolist()
    x_start = x             # the corrected point of the previous level (level 0: the input itself)
    d_prev = d_prev2 = None
    for i, (c_x, c_0, c_1, _) in enumerate(predictor):
        d = denoise(x, i)   # x: the point predicted for level i
        if i > 0:
            k_x, k_0, k_1, k_next = corrector[i - 1]
            x = k_x * x_start + k_0 * d_prev + k_next * d
            if k_1 != 0.0:
                x = x + k_1 * d_prev2
        x_start = x
        x = c_x * x_start + c_0 * d
        if c_1 != 0.0:
            x = x + c_1 * d_prev
        d_prev2, d_prev = d_prev, d
        if callback is not None:
            callback(i, x, d)
    return x
