"""A "model" whose denoiser is exact: Gaussian data x0 ~ N(mu, diag(s^2)) on DynamiCrafter's real schedules.

For x_t = alpha x0 + sigma eps the posterior mean is closed-form,
    E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu),
and so is the probability-flow ODE: z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) stays constant along
it. Starting from x_T, the exact sample at any level is alpha mu + sqrt(alpha^2 s^2 + sigma^2) z. With zero
SNR x_T is z itself. The error measure (../shared/peers.md): |x - exact| / |s z|, relative L2.

With dynamic rescale the data at timestep t is s(t) x0 (DynamiCrafter's scale_arr), so the same formulas hold
with alpha replaced by alpha s(t); `GaussianModel` returns the v or eps that makes the sampler's pred_x0 the
exact posterior mean of s(t) x0. Used by tests/test_solvers.py, tests/test_gaussian_accuracy.py and
benchmarks/sampler_quality.py.
"""
from __future__ import annotations

import math

import torch

from dc_app.betas import dynamic_rescale_table, model_betas
from dc_app.schedule import config_tables

SHAPE = (1, 4, 4, 8, 8)  # b, C, T, H, W as in ../shared/peers.md
LINEAR = dict(linear_start=0.00085, linear_end=0.012)
N = 1000


class GaussianData:
    """mu ~ 0.3 N(0, 1), s ~ U(0.2, 0.9) per element, and a standard normal z fixing one ODE path."""

    def __init__(self, seed: int = 0, shape=SHAPE):
        g = torch.Generator().manual_seed(seed)
        self.mu = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        self.s = 0.2 + 0.7 * torch.rand(shape, generator=g, dtype=torch.float64)
        self.z = torch.randn(shape, generator=g, dtype=torch.float64)

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x0 | x] at level (alpha, sigma), float64."""
        return self.mu + alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2) * (x.to(torch.float64) - alpha * self.mu)

    def on_path(self, alpha: float, sigma: float, z: torch.Tensor | None = None) -> torch.Tensor:
        """The exact ODE solution through z at level (alpha, sigma), float64."""
        z = self.z if z is None else z
        return alpha * self.mu + (alpha**2 * self.s**2 + sigma**2).sqrt() * z

    def standardise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """x mapped by the exact marginal at the level: N(0, 1) iff x has the right distribution."""
        return (x.to(torch.float64) - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2).sqrt()

    def error(self, x: torch.Tensor, alpha: float, sigma: float) -> float:
        return float((x.to(torch.float64) - self.on_path(alpha, sigma)).norm() / (self.s * self.z).norm())


def continuous_levels(num_steps: int, lam_lo: float = -2.7, lam_hi: float = 3.5) -> tuple[torch.Tensor, torch.Tensor]:
    """num_steps + 1 levels uniform in log-SNR (no timesteps, no rounding): alpha = sigmoid(2 lambda)^(1/2)."""
    lam = torch.linspace(lam_lo, lam_hi, num_steps + 1, dtype=torch.float64)
    return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()


def solve(solver, data: GaussianData, alphas: torch.Tensor, sigmas: torch.Tensor, dtype=torch.float64, **kw):
    """Run a dc_app.solvers function with the exact denoiser from the exact x at level 0 -> its error."""
    x = data.on_path(float(alphas[0]), float(sigmas[0])).to(dtype)
    out = solver(lambda x, i: data.denoise(x, float(alphas[i]), float(sigmas[i])).to(dtype), x, alphas, sigmas, **kw)
    return data.error(out, float(alphas[-1]), float(sigmas[-1]))


class GaussianModel:
    """SamplerModel whose apply_model is the exact v (or eps) of GaussianData on a real 1000-step schedule.

    "512": zero-SNR, v (DynamiCrafter 512/1024); "256": plain, eps. `dynamic_rescale` adds scale_arr (base 0.7).
    """

    num_timesteps = N
    device = torch.device("cpu")

    def __init__(self, data: GaussianData, kind: str = "512", dynamic_rescale: bool = False, base_scale: float = 0.7):
        self.data = data
        self.parameterization = "v" if kind == "512" else "eps"
        self.rescale_betas_zero_snr = kind == "512"
        self.linear_start, self.linear_end = LINEAR["linear_start"], LINEAR["linear_end"]
        self.use_dynamic_rescale = dynamic_rescale
        self.base_scale = base_scale
        betas = model_betas(self.linear_start, self.linear_end, N, self.rescale_betas_zero_snr)
        self.ab64 = torch.cumprod(1.0 - betas, 0)
        self.scale64 = dynamic_rescale_table(base_scale, N) if dynamic_rescale else torch.ones(2 * N, dtype=torch.float64)
        tables = config_tables(self.linear_start, self.linear_end, N, self.rescale_betas_zero_snr, base_scale)
        self.alphas_cumprod = tables.alphas_cumprod  # for stock, which reads the buffers
        self.sqrt_alphas_cumprod = tables.sqrt_alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = tables.sqrt_one_minus_alphas_cumprod
        self.scale_arr = tables.scale_arr
        self.calls = 0

    def level(self, t: int) -> tuple[float, float]:
        """(alpha s(t), sigma) of timestep t: the level of the unscaled data."""
        ab = float(self.ab64[t])
        return math.sqrt(ab) * float(self.scale64[t]), math.sqrt(1.0 - ab)

    def final_level(self, t_last: int) -> tuple[float, float]:
        """DDIM's final level after a run whose smallest timestep is t_last (dynamic rescale: s(t_last))."""
        ab0 = float(self.ab64[0])
        return math.sqrt(ab0) * float(self.scale64[t_last]), math.sqrt(1.0 - ab0)

    def x_T(self) -> torch.Tensor:
        return self.data.on_path(*self.level(N - 1)).to(torch.float32)

    def apply_model(self, x, t, cond, **kw):
        self.calls += 1
        t = int(t[0])
        alpha_scaled, sigma = self.level(t)
        scale = float(self.scale64[t])
        x64 = x.to(torch.float64)
        pred = scale * self.data.denoise(x64, alpha_scaled, sigma)  # what the sampler's pred_x0 must be
        alpha = math.sqrt(float(self.ab64[t]))
        eps = (x64 - alpha * pred) / sigma
        out = alpha * eps - sigma * pred if self.parameterization == "v" else eps
        return out.to(x.dtype)
