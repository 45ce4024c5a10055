"""dc_app's samplers by name, and the two DDIM samplers: upstream's as it is (stock) and one that never yields NaN.

Registry (the public API): `make_sampler(name, model)`, `SAMPLER_NAMES`, `TIMESTEP_SPACINGS` (every step grid
dc_app's own samplers accept). Every sampler's `sample()` takes `DDIMSampler.sample`'s arguments and returns
`(samples, intermediates)` with the same `nonfinite` entry; after it, `ddim_timesteps` holds the timesteps run
and `notices` plain sentences about the settings (e.g. an ignored eta).

* "fixed" (`FixedDDIMSampler`, the default): DDIM with three repairs; finite for every setting.
* "stock" (`DDIMSampler`): upstream DynamiCrafter's DDIM, failures included; upstream's two spacings only.
* "dpmpp_2m", "dpmpp_2m_sde", "unipc" (`MultistepSampler`, dc_app/multistep.py): multistep solvers, best on
  the "logsnr" grid; finite for every setting. See docs/samplers.md.

The two DDIM samplers run the same step (`_DDIMSamplerBase._step`); they differ only in the schedule they
build, and dc_app/schedule.py holds the two schedules side by side:

* `DDIMSampler` (stock) reproduces upstream's `lvdm/models/samplers/ddim.py` dtype for dtype, failures
  included: NaN from a float32 square-root argument of -5.96e-8 (zero-SNR, eta = 1, S = 7, 11, 14, ...),
  NaN and a crash from timestep -1 ("uniform_trailing", S = 61, 103, ...), IndexError from timestep 1000
  ("uniform", S = 3, 9, 27, 36, 37, >= 501), TypeError for bfloat16 schedule buffers. Each crash is a
  `StockSamplerFailure` (dc_app/stock_failure.py), so the app reports exactly those as "stock: crashed".
* `FixedDDIMSampler` is the same arithmetic with three repairs (clamped square-root argument, repaired
  timesteps, schedule from the config's float64 betas). Wherever stock is finite on float32 buffers the two
  give bit-identical samples. See docs/nan-fix.md.

Model interface: `dc_app.sampler_model.SamplerModel`. Classifier-free guidance (dc_app/guidance.py) and the
NaN watchdog (dc_app/watchdog.py) are shared by every sampler.

Not offered (upstream has them, DynamiCrafter's image-to-video never uses them): `multiple_cond_cfg`
(`cfg_img` and `unconditional_conditioning_img_nonetext` are accepted and ignored; upstream only reads them
with multiple_cond_cfg, yet passes them on to apply_model, which ignores them), masks (`mask`, `x0`),
`quantize_x0`, `score_corrector`, `temperature`, `noise_dropout`, `precision`, the "quad" spacing.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import torch

from .loading.spec import spec_if_any
from .guidance import GuidedModel, rescale_noise_cfg
from .multistep import MULTISTEP_SOLVERS, MultistepSampler
from .sampler_args import check_variance_noise, drop_unsupported_kwargs, latent_size
from .sampler_model import SamplerModel
from .schedule import DDIMSchedule, DDPMTables, fixed_ddim_schedule, stock_ddim_schedule
from .step_grids import TIMESTEP_SPACINGS
from .stock_failure import StockRuntimeError
from .watchdog import NonfiniteWatchdog

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler", "FixedDDIMSampler", "MultistepSampler", "SAMPLER_NAMES", "TIMESTEP_SPACINGS",
           "get_fixed_ddim_sampler", "make_sampler", "rescale_noise_cfg"]


class _DDIMSamplerBase:
    """The DDIM loop and step shared by the stock and fixed samplers; subclasses only build the schedule."""

    fixed: bool = False

    def __init__(self, model: SamplerModel, **_ignored):
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule: Optional[DDIMSchedule] = None
        self.notices: list[str] = []  # DDIM uses every setting it is given: nothing to say

    # ------------------------------------------------------------------------------------------ schedule
    def _build_schedule(self, num_steps: int, spacing: str, eta: float) -> DDIMSchedule:
        raise NotImplementedError

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Build the DDIM schedule and the step coefficients on the model's device (upstream's name and args)."""
        sch = self._build_schedule(ddim_num_steps, ddim_discretize, ddim_eta)
        self.schedule = sch
        self.ddim_timesteps = sch.timesteps
        self.ddim_sigmas = sch.sigmas
        self.ddim_alphas = sch.alphas
        self.ddim_alphas_prev = sch.alphas_prev
        self.ddim_sqrt_one_minus_alphas = sch.sqrt_one_minus_alphas
        if verbose:
            logger.info("%s DDIM timesteps (%s, S=%d): %s", "fixed" if self.fixed else "stock",
                        ddim_discretize, ddim_num_steps, sch.timesteps.tolist())
        device = torch.device(self.model.device)
        ratio = sch.scale_ratio if sch.scale_ratio is not None else torch.ones_like(sch.sqrt_alphas)
        # One (n, 6) float32 table and one (n, 2) table in the buffers' dtype: moved once, indexed per step
        # (a view, no host sync).
        self._coef = torch.stack(
            [sch.sqrt_alphas, sch.sqrt_alphas_prev, sch.sqrt_one_minus_alphas32, sch.sigmas32, sch.dir_coef, ratio],
            dim=1,
        ).to(device)
        self._vcoef = torch.stack([sch.sqrt_alphas_cumprod_t, sch.sqrt_one_minus_alphas_cumprod_t], dim=1).to(device)
        self._timesteps_list = sch.timesteps.tolist()

    # ------------------------------------------------------------------------------------------ sampling
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
        """Run DDIM from x_T to a latent -> (samples, intermediates). Upstream's signature plus dc_app's options.

        shape = (C, T, H, W) (or (C, H, W)). Classifier-free guidance runs when `unconditional_conditioning` is
        given and the scale is not 1: one batched apply_model call (uncond and cond concatenated) when
        `batched_cfg`, else two calls, cond first, as upstream. `variance_noise[i]` replaces the noise draw of
        loop iteration i (i = 0 is the noisiest step); it needs one entry per step the schedule runs. Without
        it the noise comes from `generator` (or the global RNG) in upstream's order: x_T, then one draw per
        step, also at eta = 0. `callback(i, n_steps, x_prev, pred_x0)` runs after every step; raising from it
        stops sampling. `intermediates` = {"x_inter", "pred_x0" (upstream's log_every_t policy), "nonfinite":
        None or the first non-finite value as {"step", "index", "timestep", "stage"}}; `watchdog=False` skips
        that check (when on: three on-device reductions per step, one host sync per run).
        Remaining kwargs go to apply_model, as upstream; see the module docstring for what is ignored.
        """
        drop_unsupported_kwargs(kwargs)
        size = latent_size(batch_size, shape)

        # Upstream remakes the schedule on every call, from sample()'s own arguments.
        self.make_schedule(ddim_num_steps=S, ddim_discretize=timestep_spacing, ddim_eta=eta, verbose=verbose)
        n_steps = len(self._timesteps_list)
        check_variance_noise(variance_noise, n_steps, size, f"S={S}, {timestep_spacing}: timesteps "
                             f"{self._timesteps_list[:3]}...{self._timesteps_list[-1:]}")

        device = torch.device(self.model.device)
        img = torch.randn(size, device=device, generator=generator) if x_T is None else x_T
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                             guidance_rescale, fs, batched_cfg, kwargs)
        b = size[0]
        # Per-step coefficients as (1, ..., 1)-shaped views, like upstream's (b, 1, 1, 1, 1) torch.full scalars:
        # dimensioned, so a float16 buffer value times a float32 latent computes in float32, as upstream.
        view = (1,) * len(size)
        coefs = [row.unbind(0) for row in self._coef.view(n_steps, 6, *view).unbind(0)]
        vcoefs = [row.unbind(0) for row in self._vcoef.view(n_steps, 2, *view).unbind(0)]
        intermediates = {"x_inter": [img], "pred_x0": [img], "nonfinite": None}
        watch = NonfiniteWatchdog(watchdog)

        for i in range(n_steps):
            index = n_steps - 1 - i
            t = self._timesteps_list[index]
            self._check_timestep(t, i, index, S, timestep_spacing)
            ts = torch.full((b,), t, device=device, dtype=torch.long)
            # 1. Model output, with classifier-free guidance and guidance rescale.
            model_output = guided(img, ts)
            # 2.-4. DDIM update.
            if variance_noise is not None:
                noise = variance_noise[i].to(img.device)
            else:
                noise = torch.randn(img.shape, device=device, generator=generator)
            x_prev, pred_x0 = self._step(img, model_output, coefs[index], vcoefs[index], noise)
            watch.record(model_output, pred_x0, x_prev)
            img = x_prev
            if callback is not None:
                callback(i, n_steps, x_prev, pred_x0)
            if index % log_every_t == 0 or index == n_steps - 1:
                intermediates["x_inter"].append(x_prev)
                intermediates["pred_x0"].append(pred_x0)

        intermediates["nonfinite"] = watch.first_nonfinite(
            lambda i: {"step": i, "index": n_steps - 1 - i, "timestep": self._timesteps_list[n_steps - 1 - i]})
        return img, intermediates

    def _check_timestep(self, t: int, i: int, index: int, num_steps: int, spacing: str) -> None:
        """Stock only: fail where upstream fails on a -1 timestep (fixed never has one)."""

    def _step(self, x: torch.Tensor, model_output: torch.Tensor, coef, vcoef, noise: torch.Tensor):
        """One DDIM step -> (x_prev, pred_x0): upstream's p_sample_ddim after the model call.

        `coef` = (sqrt a_t, sqrt a_prev, sqrt(1 - a_t), sigma, sqrt(1 - a_prev - sigma^2), dynamic-rescale
        ratio) of this DDIM index, float32; `vcoef` = (sqrt alpha_bar_t, sqrt(1 - alpha_bar_t)) at the real
        timestep, in the tables' dtype.
        """
        sqrt_a, sqrt_a_prev, sqrt_one_minus_a, sigma_t, dir_coef, rescale = coef
        # 2. eps and the prediction of x_0 (DDIM eq. 12, "predicted x_0").
        if self.model.parameterization == "v":
            # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022), with the DDPM tables at the
            # real timestep in their own dtype (float16 buffers are multiplied as they are, like upstream).
            sqrt_ab, sqrt_one_minus_ab = vcoef
            e_t = sqrt_ab * model_output + sqrt_one_minus_ab * x
            pred_x0 = sqrt_ab * x - sqrt_one_minus_ab * model_output
        else:
            e_t = model_output
            pred_x0 = (x - sqrt_one_minus_a * e_t) / sqrt_a
        # 3. Dynamic rescale (DynamiCrafter): pred_x0 *= scale_arr[tau_{k-1}] / scale_arr[tau_k]; e_t is not.
        if self.model.use_dynamic_rescale:
            pred_x0 *= rescale
        # 4. x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise. The square root of
        #    the float32 argument was taken when the schedule was made: NaN in stock where it rounded below 0
        #    (zero-SNR, eta = 1, tau = 999: -5.96e-8), 0 in fixed after the clamp (REPAIR 1).
        dir_xt = dir_coef * e_t
        x_prev = sqrt_a_prev * pred_x0 + dir_xt + sigma_t * noise
        return x_prev, pred_x0


class DDIMSampler(_DDIMSamplerBase):
    """Upstream DynamiCrafter's DDIM sampler, failures included (the app's "stock" sampler)."""

    fixed = False

    def _build_schedule(self, num_steps: int, spacing: str, eta: float) -> DDIMSchedule:
        m = self.model
        tables = DDPMTables(
            alphas_cumprod=m.alphas_cumprod,
            sqrt_alphas_cumprod=m.sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod=m.sqrt_one_minus_alphas_cumprod,
            scale_arr=m.scale_arr if m.use_dynamic_rescale else None,
        )
        return stock_ddim_schedule(tables, spacing, num_steps, eta, self.ddpm_num_timesteps)

    def _check_timestep(self, t: int, i: int, index: int, num_steps: int, spacing: str) -> None:
        # "uniform_trailing" S = 61, 103, 121, ...: numpy's arange adds an element and the first timestep is -1.
        # Upstream runs the model at t = -1, then its v->eps conversion gathers the buffers at -1 and raises
        # (the sample is NaN by then anyway). dc_app raises before spending the model call.
        if t < 0 and self.model.parameterization == "v":
            raise StockRuntimeError(
                f"{spacing} spacing with {num_steps} steps reaches timestep {t} at step i={i} (DDIM index {index}): "
                f"out of range 0..{self.ddpm_num_timesteps - 1}, the v-prediction conversion cannot gather it "
                f"(upstream: RuntimeError: index {t} is out of bounds for dimension 0 with size "
                f"{self.ddpm_num_timesteps})"
            )


class FixedDDIMSampler(_DDIMSamplerBase):
    """Stock DDIM with three repairs; finite for every setting (see docs/nan-fix.md)."""

    fixed = True

    def _build_schedule(self, num_steps: int, spacing: str, eta: float) -> DDIMSchedule:
        m = self.model
        return fixed_ddim_schedule(
            float(m.linear_start), float(m.linear_end), bool(m.rescale_betas_zero_snr), spacing, num_steps, float(eta),
            num_timesteps=self.ddpm_num_timesteps,
            base_scale=float(m.base_scale) if m.use_dynamic_rescale else None,
        )


def default_timestep_spacing(model) -> str:
    """The model spec's spacing; for a bare upstream config, "uniform_trailing" for zero-SNR models, as
    upstream's run scripts choose, else "uniform"."""
    spec = spec_if_any(model.config) if getattr(model, "config", None) is not None else None
    if spec is not None:
        return spec.defaults.timestep_spacing
    return "uniform_trailing" if getattr(model, "rescale_betas_zero_snr", False) else "uniform"


def get_fixed_ddim_sampler(model, ddim_steps: int, ddim_eta: float, verbose: bool = False) -> FixedDDIMSampler:
    """A FixedDDIMSampler with its schedule made for these values and the model's default spacing.

    `sample()` remakes the schedule from its own arguments, as upstream does.
    """
    sampler = FixedDDIMSampler(model)
    sampler.make_schedule(ddim_steps, default_timestep_spacing(model), ddim_eta, verbose=verbose)
    return sampler


# ------------------------------------------------------------------------------------------ registry

SAMPLER_NAMES = ("fixed", "stock", *MULTISTEP_SOLVERS)


def make_sampler(name: str, model: SamplerModel):
    """The sampler called `name` (one of SAMPLER_NAMES) for `model`."""
    if name == "fixed":
        return FixedDDIMSampler(model)
    if name == "stock":
        return DDIMSampler(model)
    if name in MULTISTEP_SOLVERS:
        return MultistepSampler(model, name)
    raise ValueError(f"sampler {name!r}: expected one of {', '.join(SAMPLER_NAMES)}")
