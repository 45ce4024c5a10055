"""Sampler quality: error vs steps of every deterministic sampler on every grid, and the speed-up it buys.

    python benchmarks/sampler_quality.py                     # error tables (CPU, ~1 min)
    python benchmarks/sampler_quality.py --time tiny         # plus seconds per step of every sampler
    python benchmarks/sampler_quality.py --time 512          # on a GPU: seeded random weights, bf16 UNet

The model is the exact denoiser of Gaussian data (tests/gaussian_model.py, the measure of ../shared/peers.md)
on DynamiCrafter's real schedules: "512" = zero-terminal-SNR v-prediction (512, 1024, interp), "256" = plain
eps. The exact probability-flow ODE solution is known, so the error of a sampler's output is measured, not
estimated: |x - exact| / |s z| at the final level. No weights are needed and the figures do not depend on a
machine.

Printed: (1) the error table for S in {5, 10, 15, 20, 25, 50, 100, 200}; (2) for each sampler and grid, the
fewest steps whose error is at most that of DDIM with 50 steps on the model's default grid, and the ratio of
UNet calls (every sampler makes one guided UNet call per step); (3) with --time, seconds per step of each
sampler with CFG on one model (the same UNet calls; what differs is the solver's arithmetic).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dc_app.sampling import make_sampler  # noqa: E402
from gaussian_model import SHAPE, GaussianData, GaussianModel  # noqa: E402

STEPS = (5, 10, 15, 20, 25, 50, 100, 200)
SAMPLERS = ("fixed", "dpmpp_2m", "unipc")           # the deterministic ones (fixed at eta 0 is DDIM)
GRIDS = ("uniform", "uniform_trailing", "logsnr")
DEFAULT_GRID = {"512": "uniform_trailing", "256": "uniform"}
COND = {"c_concat": [torch.zeros(1)], "c_crossattn": [torch.zeros(1)]}


def error(kind: str, name: str, grid: str, steps: int, seed: int = 0) -> float:
    data = GaussianData(seed)
    model = GaussianModel(data, kind)
    sampler = make_sampler(name, model)
    x, inter = sampler.sample(steps, 1, SHAPE[1:], COND, eta=0.0, x_T=model.x_T(), timestep_spacing=grid,
                              verbose=False)
    if inter["nonfinite"] is not None:
        return math.inf
    return data.error(x, *model.final_level(int(sampler.ddim_timesteps.min())))


def steps_to_match(kind: str, name: str, grid: str, target: float, limit: int = 60) -> int | None:
    """Fewest S <= limit with error <= target, scanning up from 1 (errors need not fall monotonically)."""
    for steps in range(1, limit + 1):
        if error(kind, name, grid, steps) <= target:
            return steps
    return None


def quality_tables() -> None:
    for kind in ("512", "256"):
        print(f"\n## {kind}: {'zero-SNR, v-prediction' if kind == '512' else 'plain schedule, eps-prediction'}")
        print("\n| sampler | grid | " + " | ".join(f"S={s}" for s in STEPS) + " |")
        print("|---|---|" + "---|" * len(STEPS))
        for name in SAMPLERS:
            for grid in GRIDS:
                row = [error(kind, name, grid, s) for s in STEPS]
                label = "DDIM (fixed, eta 0)" if name == "fixed" else name
                print(f"| {label} | {grid} | " + " | ".join(f"{e:.1e}" for e in row) + " |")
        target = error(kind, "fixed", DEFAULT_GRID[kind], 50)
        print(f"\nDDIM-50 on {DEFAULT_GRID[kind]}: error {target:.2e}. Steps to reach it:\n")
        print("| sampler | grid | steps | UNet calls vs DDIM-50 |")
        print("|---|---|---|---|")
        for name in SAMPLERS:
            for grid in GRIDS:
                steps = steps_to_match(kind, name, grid, target)
                label = "DDIM (fixed, eta 0)" if name == "fixed" else name
                cell = "more than 60" if steps is None else f"{steps}"
                ratio = "-" if steps is None else f"{steps / 50:.2f} ({50 / steps:.1f}x fewer)"
                print(f"| {label} | {grid} | {cell} | {ratio} |")


def step_times(model_name: str, steps: int, repeats: int) -> None:
    """Seconds per sampling step (CFG 7.5, batched) of every sampler on one model, timed interleaved."""
    from _common import (clock_for, default_device, describe_device, interleaved, model_config, random_model, report,
                         unet_inputs)
    from dc_app.sampling import SAMPLER_NAMES

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model = random_model(model_config(model_name), device, unet_only=True, dtype=dtype)
    x, _, cond, fs = unet_inputs(model, 1, model.temporal_length, device)
    uncond = {"c_concat": cond["c_concat"], "c_crossattn": [torch.zeros_like(cond["c_crossattn"][0])]}
    print(f"\n## seconds per step, {model_name} model, {steps} steps, {describe_device(device)}")

    def variant(name):
        def run():
            sampler = make_sampler(name, model)
            sampler.sample(steps, 1, tuple(x.shape[1:]), cond, eta=0.0, x_T=x, unconditional_guidance_scale=7.5,
                           unconditional_conditioning=uncond, fs=fs, timestep_spacing="uniform_trailing",
                           verbose=False)
        return run

    names = [n for n in SAMPLER_NAMES if n != "stock" or model.alphas_cumprod.dtype != torch.bfloat16]
    times = interleaved({n: variant(n) for n in names}, repeats, device, clock_for(device))
    report({n: [t / steps for t in v] for n, v in times.items()}, baseline="fixed", unit="ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", metavar="MODEL", help="also time every sampler's steps on this model (tiny, 512, ...)")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed run (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see benchmarks/README)")
    parser.add_argument("--no-quality", action="store_true", help="skip the error tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_quality:
        quality_tables()
    if args.time:
        step_times(args.time, args.steps, args.repeats)


if __name__ == "__main__":
    main()
