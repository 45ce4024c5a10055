"""Multistep samplers for DynamiCrafter: DPM-Solver++(2M), its SDE variant and UniPC, behind DDIM's interface.

`MultistepSampler(model, solver).sample(...)` takes `DDIMSampler.sample`'s arguments and returns the same
`(samples, intermediates)`; the solvers themselves are the small functions of dc_app/solvers.py, run over the
noise levels of a step grid (dc_app/step_grids.py). What this module adds is the mapping from DynamiCrafter's
model and schedule to those levels and to a denoiser:

* Schedule: alpha_bar from the config's float64 betas (as the fixed DDIM sampler), never from the model's
  buffers, so float16 / bfloat16 buffers change nothing.
* Levels: the grid's timesteps, noisiest first, then the final level alpha_bar[0], the level DDIM's last step
  goes to. That last step is an ordinary solver step (a posterior-mean "denoise" from the last timestep is a
  large error, see docs/samplers.md).
* Denoiser: guided model output (CFG, then guidance rescale, as upstream) -> x0 estimate: v models
  x0 = alpha x - sigma v, eps models x0 = (x - sigma eps) / alpha. An eps model cannot be sampled from zero
  SNR (alpha = 0 leaves x0 undefined); that combination, which no DynamiCrafter config has, is refused.
* Dynamic rescale (`use_dynamic_rescale`, 512/1024): DynamiCrafter trained on data scaled by s(t) =
  scale_arr[t] at timestep t, x_t = alpha_t s(t) x0 + sigma_t eps, and DDIM multiplies pred_x0 by
  s(t_prev) / s(t). That is a change of schedule: levels alpha~ = alpha_t s(t), sigma~ = sigma_t, and the
  denoiser's x0 is pred_x0 / s(t). DDIM with the ratio is exactly the first-order step on those levels (the
  algebra is in docs/samplers.md, and tests/test_solvers.py checks it against the fixed DDIM sampler), so a
  multistep solver runs on the same levels. DDIM's last step keeps the ratio at 1, so the final level is
  alpha_bar[0]'s alpha times s(t_0), t_0 the smallest timestep, exactly where DDIM ends.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

import torch

from .betas import dynamic_rescale_table, model_betas
from .guidance import GuidedModel
from .sampler_args import check_variance_noise, drop_unsupported_kwargs, latent_size
from .sampler_model import SamplerModel
from .solvers import sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .step_grids import grid_timesteps
from .watchdog import NonfiniteWatchdog

logger = logging.getLogger(__name__)

# name -> (solver function, takes eta and noise)
MULTISTEP_SOLVERS = {
    "dpmpp_2m": (sample_dpmpp_2m, False),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, True),
    "unipc": (sample_unipc, False),
}
# Also accepted by MultistepSampler, not offered in the app: the first-order step on the same levels, which is
# the fixed DDIM sampler at eta 0 (the tests check the level mapping with it).
_REFERENCE_SOLVERS = {"ddim": (sample_ddim, False)}
_SOLVERS = {**MULTISTEP_SOLVERS, **_REFERENCE_SOLVERS}


@dataclass(frozen=True)
class SolverLevels:
    """One run's grid and levels. Per step i (0 = noisiest): `run_timesteps[i]`, the model's own alpha_t,
    sigma_t (for the v / eps conversion) and s(t) (dynamic rescale, 1 without); `alphas`, `sigmas` (n + 1) are
    the solver's levels, the last one the final level."""

    timesteps: torch.Tensor        # int64 (n,), ascending, as DDIM's `ddim_timesteps`
    run_timesteps: tuple[int, ...]
    alpha_t: tuple[float, ...]
    sigma_t: tuple[float, ...]
    scale: tuple[float, ...]
    alphas: torch.Tensor           # float64 (n + 1,)
    sigmas: torch.Tensor


@lru_cache(maxsize=64)
def solver_levels(linear_start: float, linear_end: float, zero_snr: bool, spacing: str, num_steps: int,
                  num_timesteps: int = 1000, base_scale: Optional[float] = None) -> SolverLevels:
    """The levels a multistep solver runs for these config values; `base_scale` None: no dynamic rescale."""
    alphas_cumprod = torch.cumprod(1.0 - model_betas(linear_start, linear_end, num_timesteps, zero_snr), 0)
    ts = grid_timesteps(spacing, num_steps, linear_start, linear_end, num_timesteps, zero_snr)
    run = ts.flip(0)
    alpha_t, sigma_t = alphas_cumprod[run].sqrt(), (1.0 - alphas_cumprod[run]).sqrt()
    if base_scale is None:
        scale = torch.ones_like(alpha_t)
    else:
        scale = dynamic_rescale_table(base_scale, num_timesteps)[run]
    final_alpha = alphas_cumprod[:1].sqrt() * scale[-1:]
    final_sigma = (1.0 - alphas_cumprod[:1]).sqrt()
    return SolverLevels(
        timesteps=ts, run_timesteps=tuple(run.tolist()),
        alpha_t=tuple(alpha_t.tolist()), sigma_t=tuple(sigma_t.tolist()), scale=tuple(scale.tolist()),
        alphas=torch.cat([alpha_t * scale, final_alpha]), sigmas=torch.cat([sigma_t, final_sigma]),
    )


class MultistepSampler:
    """A dc_app multistep sampler by solver name (MULTISTEP_SOLVERS); finite for every setting.

    After sample(): `ddim_timesteps` (the timesteps run, ascending, as DDIM's attribute), `levels`, and
    `notices`: plain sentences about the settings (e.g. an eta the solver ignores), also in intermediates.
    """

    def __init__(self, model: SamplerModel, solver: str):
        if solver not in _SOLVERS:
            raise ValueError(f"solver {solver!r}: expected one of {', '.join(_SOLVERS)}")
        self.model = model
        self.solver = solver
        self.stochastic = _SOLVERS[solver][1]
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.levels: Optional[SolverLevels] = None
        self.ddim_timesteps: Optional[torch.Tensor] = None
        self.notices: list[str] = []

    def make_schedule(self, num_steps: int, spacing: str, eta: float = 0.0, verbose: bool = False) -> SolverLevels:
        m = self.model
        if m.parameterization not in ("v", "eps"):
            raise ValueError(f"parameterization={m.parameterization!r}: expected 'v' or 'eps'")
        if m.parameterization == "eps" and m.rescale_betas_zero_snr:
            raise ValueError("an eps-prediction model cannot be sampled on a zero-terminal-SNR schedule: at "
                             "alpha_bar = 0 its x0 estimate (x - sigma eps) / alpha is undefined (arXiv:2305.08891)")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta={eta!r}: expected a value in [0, 1]")
        self.levels = solver_levels(
            float(m.linear_start), float(m.linear_end), bool(m.rescale_betas_zero_snr), spacing, int(num_steps),
            self.ddpm_num_timesteps, float(m.base_scale) if m.use_dynamic_rescale else None,
        )
        self.ddim_timesteps = self.levels.timesteps
        self.notices = []
        if not self.stochastic and float(eta) > 0.0:
            self.notices.append(f"eta={float(eta):g} is ignored: {self.solver} is deterministic "
                                f"(dpmpp_2m_sde is its stochastic counterpart)")
        if verbose:
            logger.info("%s timesteps (%s, S=%d): %s", self.solver, spacing, num_steps, self.levels.run_timesteps)
        return self.levels

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning=None,
        eta: float = 0.0,
        x_T: Optional[torch.Tensor] = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        fs: Optional[torch.Tensor] = None,
        timestep_spacing: str = "uniform",
        guidance_rescale: float = 0.0,
        callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
        verbose: bool = True,
        variance_noise: Optional[Union[Sequence[torch.Tensor], torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        batched_cfg: bool = True,
        watchdog: bool = True,
        log_every_t: int = 100,
        **kwargs,
    ):
        """Run the solver from x_T -> (samples, intermediates); DDIMSampler.sample's arguments and results.

        eta: dpmpp_2m_sde's noise scale (0 is dpmpp_2m); the deterministic solvers ignore it, with a notice.
        `variance_noise[i]` (stochastic solver only) replaces step i's noise draw; without it the noise comes
        from `generator` after x_T, one draw per step. `intermediates` = {"x_inter", "pred_x0" (every
        log_every_t steps), "nonfinite" (None or {"step", "index", "timestep", "stage"}), "notices"}.
        """
        drop_unsupported_kwargs(kwargs)
        size = latent_size(batch_size, shape)
        lv = self.make_schedule(S, timestep_spacing, eta, verbose=verbose)
        n_steps = len(lv.run_timesteps)
        if variance_noise is not None and not self.stochastic:
            raise ValueError(f"variance_noise: {self.solver} is deterministic and draws no noise")
        check_variance_noise(variance_noise, n_steps, size, f"S={S}, {timestep_spacing}")

        device = torch.device(self.model.device)
        x = torch.randn(size, device=device, generator=generator) if x_T is None else x_T
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale, fs, batched_cfg, kwargs)
        is_v = self.model.parameterization == "v"
        watch = NonfiniteWatchdog(watchdog)
        intermediates = {"x_inter": [x], "pred_x0": [x], "nonfinite": None, "notices": list(self.notices)}
        last_output: list[torch.Tensor] = []  # the model output of the current step, for the watchdog

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            ts = torch.full((size[0],), lv.run_timesteps[i], device=device, dtype=torch.long)
            out = guided(x, ts)
            a, s = lv.alpha_t[i], lv.sigma_t[i]
            x0 = a * x - s * out if is_v else (x - s * out) / a
            last_output[:] = [out]
            # Dynamic rescale: pred_x0 estimates s(t) x0; the solver's levels are those of x0 itself.
            return x0 * (1.0 / lv.scale[i]) if lv.scale[i] != 1.0 else x0

        def on_step(i: int, x_next: torch.Tensor, x0: torch.Tensor) -> None:
            watch.record(last_output[0], x0, x_next)
            if callback is not None:
                callback(i, n_steps, x_next, x0)
            index = n_steps - 1 - i
            if index % log_every_t == 0 or index == n_steps - 1:
                intermediates["x_inter"].append(x_next)
                intermediates["pred_x0"].append(x0)

        fn, takes_noise = _SOLVERS[self.solver]
        if takes_noise:
            def noise(i: int, like: torch.Tensor) -> torch.Tensor:
                if variance_noise is not None:
                    return variance_noise[i].to(like.device)
                return torch.randn(like.shape, device=device, generator=generator)

            x = fn(denoise, x, lv.alphas, lv.sigmas, eta=float(eta), noise_sampler=noise, callback=on_step)
        else:
            x = fn(denoise, x, lv.alphas, lv.sigmas, callback=on_step)

        intermediates["nonfinite"] = watch.first_nonfinite(
            lambda i: {"step": i, "index": n_steps - 1 - i, "timestep": lv.run_timesteps[i]})
        return x, intermediates
