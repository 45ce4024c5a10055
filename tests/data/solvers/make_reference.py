"""Writes diffusers_reference.safetensors: diffusers' multistep schedulers driven by the exact Gaussian denoiser.

Needs diffusers (not a dc_app dependency; 0.42.1 made the stored file): `python tests/data/solvers/make_reference.py`.
The 256 schedule (plain, linear 0.00085..0.012) with v-prediction, "trailing" spacing, 20 steps, final level
alpha_bar[0] (final_sigmas_type="sigma_min"); UniPC without lower_order_final so that every step is order 2,
as dc_app's. tests/test_solvers.py runs dc_app's solvers on the stored levels and compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

try:  # the peer being compared with; not a dc_app or test dependency
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
except ImportError:
    sys.exit("make_reference.py needs diffusers: pip install diffusers")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

from dc_app.betas import model_betas  # noqa: E402
from gaussian_model import GaussianData  # noqa: E402

STEPS = 20
CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type="v_prediction", timestep_spacing="trailing", final_sigmas_type="sigma_min")


def main() -> None:
    data = GaussianData(0)
    alphas_cumprod = torch.cumprod(1.0 - model_betas(0.00085, 0.012, 1000, False), 0)
    schedulers = {
        "dpmpp_2m": DPMSolverMultistepScheduler(**CONFIG, algorithm_type="dpmsolver++", solver_order=2),
        "unipc": UniPCMultistepScheduler(**CONFIG, solver_order=2, solver_type="bh2", predict_x0=True,
                                         lower_order_final=False),
    }
    out = {"mu": data.mu, "s": data.s}
    for name, scheduler in schedulers.items():
        scheduler.set_timesteps(STEPS)
        ts = scheduler.timesteps.long()
        a, s = alphas_cumprod[ts].sqrt(), (1.0 - alphas_cumprod[ts]).sqrt()
        x = data.on_path(float(a[0]), float(s[0]))
        out["x_T"] = x.clone()
        for i, t in enumerate(ts):
            x0 = data.denoise(x, float(a[i]), float(s[i]))
            v = (float(a[i]) * x - x0) / float(s[i])
            x = scheduler.step(v, t, x).prev_sample
        out[f"out_{name}"] = x
        out["alphas"] = torch.cat([a, alphas_cumprod[:1].sqrt()])
        out["sigmas"] = torch.cat([s, (1.0 - alphas_cumprod[:1]).sqrt()])
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "diffusers_reference.safetensors"))


if __name__ == "__main__":
    main()
