"""DDIM sampling for DynamiCrafter: upstream's sampler as it is (stock) and a sampler that never yields NaN.

Both samplers run the same step (`_DDIMSamplerBase._step`); they differ only in the schedule they build,
and dc_app/schedule.py holds the two schedules side by side:

* `DDIMSampler` (stock) reproduces upstream's `lvdm/models/samplers/ddim.py` dtype for dtype, failures
  included: NaN from a float32 square-root argument of -5.96e-8 (zero-SNR, eta = 1, S = 7, 11, 14, ...),
  NaN and a crash from timestep -1 ("uniform_trailing", S = 61, 103, ...), IndexError from timestep 1000
  ("uniform", S = 3, 9, 27, 36, 37, >= 501), TypeError for bfloat16 schedule buffers. The app uses it to show
  those failures as they are.
* `FixedDDIMSampler` is the same arithmetic with three repairs (clamped square-root argument, repaired
  timesteps, schedule from the config's float64 betas). Wherever stock is finite on float32 buffers the two
  give bit-identical samples. See docs/nan-fix.md.

Model interface used: `apply_model(x, t, cond, **kw)`, `parameterization` ("v" | "eps"), `num_timesteps`,
`use_dynamic_rescale`, `device`; stock reads the buffers `alphas_cumprod`, `sqrt_alphas_cumprod`,
`sqrt_one_minus_alphas_cumprod`, `scale_arr`; fixed reads the config values `linear_start`, `linear_end`,
`rescale_betas_zero_snr`, `base_scale`.

Not offered (upstream has them, DynamiCrafter's image-to-video never uses them): `multiple_cond_cfg`
(`cfg_img` and `unconditional_conditioning_img_nonetext` are accepted and ignored; upstream only reads them
with multiple_cond_cfg, yet passes them on to apply_model, which ignores them), masks (`mask`, `x0`),
`quantize_x0`, `score_corrector`, `temperature`, `noise_dropout`, `precision`, the "quad" spacing.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .config import spec_if_any
from .schedule import DDIMSchedule, DDPMTables, fixed_ddim_schedule, stock_ddim_schedule

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler", "FixedDDIMSampler", "get_fixed_ddim_sampler", "rescale_noise_cfg"]

# kwargs of upstream's sample() that only its multiple_cond_cfg branch reads; dc_app drops them.
IGNORED_KWARGS = ("cfg_img", "unconditional_conditioning_img_nonetext")
# upstream sample() options dc_app does not implement; accepted only at their inactive value.
_INACTIVE_KWARGS = {"mask": None, "x0": None, "quantize_x0": False, "score_corrector": None,
                    "temperature": 1.0, "noise_dropout": 0.0, "precision": None, "multiple_cond_cfg": False}


def rescale_noise_cfg(model_output: torch.Tensor, cond_output: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (arXiv:2305.08891, eq. 15-16), as upstream: match the guided output's std to the
    conditional output's (unbiased std over all non-batch dims), then blend with weight phi."""
    dims = list(range(1, cond_output.ndim))
    std_cond = cond_output.std(dim=dims, keepdim=True)
    std_cfg = model_output.std(dim=dims, keepdim=True)
    rescaled = model_output * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * model_output


def _cat_batch(uncond: Any, cond: Any, what: str) -> Any:
    """Concatenate two conditionings of the same structure along the batch (uncond first)."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond], dim=0)
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"{what}: cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {k: _cat_batch(uncond[k], cond[k], f"{what}[{k!r}]") for k in cond}
    if isinstance(cond, (list, tuple)):
        if len(cond) != len(uncond):
            raise ValueError(f"{what}: cond has {len(cond)} entries, uncond {len(uncond)}")
        return type(cond)(_cat_batch(u, c, f"{what}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is uncond or cond == uncond:
        return cond
    raise ValueError(f"{what}: cannot batch {type(cond).__name__} values that differ between cond and uncond")


class _DDIMSamplerBase:
    """The DDIM loop and step shared by the stock and fixed samplers; subclasses only build the schedule."""

    fixed: bool = False

    def __init__(self, model, **_ignored):
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule: Optional[DDIMSchedule] = None

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
        for name in IGNORED_KWARGS:
            kwargs.pop(name, None)
        for name, inactive in _INACTIVE_KWARGS.items():
            if name in kwargs:
                value = kwargs.pop(name)
                if not (value is inactive or (not isinstance(value, torch.Tensor) and value == inactive)):
                    raise ValueError(f"{name}={value!r} is not supported by dc_app's DDIM samplers (only {inactive!r})")

        if len(shape) not in (3, 4):
            raise ValueError(f"shape={tuple(shape)}: expected (C, T, H, W) or (C, H, W)")
        size = (int(batch_size), *(int(d) for d in shape))

        # Upstream remakes the schedule on every call, from sample()'s own arguments.
        self.make_schedule(ddim_num_steps=S, ddim_discretize=timestep_spacing, ddim_eta=eta, verbose=verbose)
        n_steps = len(self._timesteps_list)

        if variance_noise is not None:
            if len(variance_noise) != n_steps:
                raise ValueError(
                    f"variance_noise has {len(variance_noise)} entries but the schedule runs {n_steps} steps "
                    f"(S={S}, {timestep_spacing}: timesteps {self._timesteps_list[:3]}...{self._timesteps_list[-1:]})"
                )
            for i in range(n_steps):
                if tuple(variance_noise[i].shape) != tuple(size):
                    raise ValueError(f"variance_noise[{i}] has shape {tuple(variance_noise[i].shape)}, expected {size}")

        device = torch.device(self.model.device)
        if x_T is None:
            img = torch.randn(size, device=device, generator=generator)
        else:
            img = x_T

        use_cfg = unconditional_conditioning is not None and unconditional_guidance_scale != 1.0
        b = size[0]
        # Per-step coefficients as (1, ..., 1)-shaped views, like upstream's (b, 1, 1, 1, 1) torch.full scalars:
        # dimensioned, so a float16 buffer value times a float32 latent computes in float32, as upstream.
        view = (1,) * len(size)
        coefs = [row.unbind(0) for row in self._coef.view(n_steps, 6, *view).unbind(0)]
        vcoefs = [row.unbind(0) for row in self._vcoef.view(n_steps, 2, *view).unbind(0)]
        intermediates = {"x_inter": [img], "pred_x0": [img], "nonfinite": None}
        extremes: list[torch.Tensor] = []

        for i in range(n_steps):
            index = n_steps - 1 - i
            t = self._timesteps_list[index]
            self._check_timestep(t, i, index, S, timestep_spacing)
            ts = torch.full((b,), t, device=device, dtype=torch.long)

            # 1. Model output, with classifier-free guidance and guidance rescale.
            if not use_cfg:
                model_output = self.model.apply_model(img, ts, conditioning, fs=fs, **kwargs)
            else:
                if batched_cfg:
                    out = self.model.apply_model(
                        torch.cat([img, img]), torch.cat([ts, ts]),
                        _cat_batch(unconditional_conditioning, conditioning, "conditioning"),
                        fs=torch.cat([fs, fs]) if isinstance(fs, torch.Tensor) and fs.ndim > 0 else fs,
                        **{k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == b
                           else v for k, v in kwargs.items()},
                    )
                    out_uncond, out_cond = out[:b], out[b:]
                else:
                    out_cond = self.model.apply_model(img, ts, conditioning, fs=fs, **kwargs)
                    out_uncond = self.model.apply_model(img, ts, unconditional_conditioning, fs=fs, **kwargs)
                model_output = out_uncond + unconditional_guidance_scale * (out_cond - out_uncond)
                if guidance_rescale > 0.0:
                    model_output = rescale_noise_cfg(model_output, out_cond, guidance_rescale)

            # 2.-4. DDIM update.
            if variance_noise is not None:
                noise = variance_noise[i].to(img.device)
            else:
                noise = torch.randn(img.shape, device=device, generator=generator)
            x_prev, pred_x0 = self._step(img, model_output, coefs[index], vcoefs[index], noise)

            if watchdog:
                # min and max of each stage, left on the device and read once after the loop (no per-step host
                # sync). aminmax is one reduction pass without a temporary that propagates NaN and keeps +-inf:
                # both extremes are finite iff every element is. On CPU it is far cheaper than
                # isfinite(x).all() (measured 40 us vs 2 ms on a 1x4x16x40x64 latent).
                for stage in (model_output, pred_x0, x_prev):
                    extremes.extend(torch.aminmax(stage))
            img = x_prev
            if callback is not None:
                callback(i, n_steps, x_prev, pred_x0)
            if index % log_every_t == 0 or index == n_steps - 1:
                intermediates["x_inter"].append(x_prev)
                intermediates["pred_x0"].append(pred_x0)

        if watchdog and extremes:
            ok = torch.isfinite(torch.stack(extremes).view(-1, 3, 2)).all(dim=2).cpu()  # the single sync
            bad = (~ok).nonzero()
            if len(bad):
                i, stage = (int(v) for v in bad[0])
                index = n_steps - 1 - i
                intermediates["nonfinite"] = {
                    "step": i, "index": index, "timestep": self._timesteps_list[index],
                    "stage": ("model_output", "pred_x0", "x_prev")[stage],
                }
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
            raise RuntimeError(
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
