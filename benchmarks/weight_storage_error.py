"""Error of 8-bit UNet weights (fp8, int8) against the plain fp32 and fp16 models, and the UNet's weight bytes.

    python benchmarks/weight_storage_error.py                          # tiny and reduced, CPU, ~10 min
    python benchmarks/weight_storage_error.py --models tiny            # ~1 min
    python benchmarks/weight_storage_error.py --models reduced --latent 40x64 --frames 16   # the real layout

Variants: the plain model in fp32 and fp16, and the UNet stored in fp8 or int8 (store_weights_8bit) with
fp32 or fp16 compute. Every variant gets the same inputs and the same injected noise (x_T, every step's
noise, the VAE posterior draws), so differences are the weights' rounding only. Errors are relative L2,
|a - ref| / |ref|, against the plain fp32 model and against the plain fp16 model:
- "UNet": one apply_model (batch 2, t = 999 and 400, random conditioning);
- "eta 0", "eta 1": the final latent of a fixed-DDIM sample (`--steps`, CFG 7.5 batched, rescale 0.7,
  uniform_trailing). tiny runs the whole pipeline (run_synthesis); reduced (512 layout, model_channels 64)
  runs the denoising loop on random conditioning, since its encoders and VAE would be full size.
Weights: seeded random (benchmarks/_common.random_model; for tiny the same as load_pretrained("tiny")).
Bytes: the UNet's parameters and buffers, as a memory estimate counts them. fp16 on CPU is slow (no fast
kernels): the reduced model runs at a small latent (`--latent`, default 16x24) and 4 frames by default.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import DTYPES, describe_device, model_config, random_model, unet_inputs
from dc_app.models.weight_storage import WEIGHT_STORAGE_KINDS, store_weights_8bit
from dc_app.pipeline import run_synthesis
from dc_app.sampling import FixedDDIMSampler

MODELS = {"tiny": ("tiny", None), "reduced": ("512", 64)}
RUN = dict(unconditional_guidance_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def unet_bytes(model) -> int:
    unet = model.model.diffusion_model
    return sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])


class Inputs:
    """Every input and random draw of one model's measurements, from one seeded generator."""

    def __init__(self, model, name: str, frames: int, steps: int):
        self.name, self.frames, self.steps = name, frames, steps
        device = torch.device("cpu")
        self.unet = unet_inputs(model, 2, frames, device, seed=2)
        self.unet[1][:] = torch.tensor([999, 400])
        h, w = model.image_size
        self.shape = (1, 4, frames, h, w)
        g = torch.Generator().manual_seed(1)
        self.x_T = torch.randn(self.shape, generator=g)
        self.noise = torch.randn(steps, *self.shape, generator=g)
        if name == "tiny":
            self.video = torch.rand(1, 3, frames, 8 * h, 8 * w, generator=g) * 2 - 1
            self.posterior = torch.randn(frames, 4, h, w, generator=g)
        else:
            _, _, self.cond, self.fs = unet_inputs(model, 1, frames, device, seed=3)
            _, _, self.uncond, _ = unet_inputs(model, 1, frames, device, seed=4)


def measure(model, inputs: Inputs) -> dict[str, torch.Tensor]:
    """{"UNet": output, "eta 0": final latent, "eta 1": final latent} of one variant."""
    x, t, cond, fs = inputs.unet
    with torch.no_grad():
        out = {"UNet": model.apply_model(x, t, cond, fs=fs)}
    for eta in (0.0, 1.0):
        if inputs.name == "tiny":
            latents = []
            run_synthesis(model, "fixed", ["a cat playing piano"], inputs.video, inputs.shape, ddim_steps=inputs.steps,
                          ddim_eta=eta, fs=24, x_T=inputs.x_T, variance_noise=inputs.noise,
                          posterior_noise=inputs.posterior, callback=lambda i, n, z, p: latents.append(z), **RUN)
            latent = latents[-1]
        else:
            latent, _ = FixedDDIMSampler(model).sample(
                inputs.steps, 1, inputs.shape[1:], conditioning=inputs.cond, eta=eta, x_T=inputs.x_T,
                unconditional_conditioning=inputs.uncond, fs=inputs.fs, variance_noise=inputs.noise,
                verbose=False, batched_cfg=True, **RUN)
        out[f"eta {eta:g}"] = latent.float()
    return out


def run_model(name: str, args) -> list[str]:
    cfg_name, channels = MODELS[name]
    cfg = model_config(cfg_name, channels)
    plain = {"fp32": random_model(cfg, torch.device("cpu"), unet_only=(name != "tiny"))}
    plain["fp16"] = copy.deepcopy(plain["fp32"]).set_dtype(DTYPES["fp16"])
    if name != "tiny":
        h, w = args.latent
        for model in plain.values():
            model.image_size = (h, w)  # the UNet takes any latent size that halves cleanly 3 times
    frames = args.frames or plain["fp32"].temporal_length
    inputs = Inputs(plain["fp32"], name, frames, args.steps)
    print(f"\n{name}: latent {inputs.shape[3]}x{inputs.shape[4]}, {frames} frames, {args.steps} steps", flush=True)

    # (label, compute dtype, storage or None); each 8-bit copy is built when its turn comes, one at a time.
    variants = [("fp32 (plain)", "fp32", None), ("fp16 (plain)", "fp16", None)]
    variants += [(f"{kind}, {compute} compute", compute, kind)
                 for compute in ("fp32", "fp16") for kind in WEIGHT_STORAGE_KINDS]
    results, rows = {}, []
    for label, compute, kind in variants:
        model = plain[compute]
        if kind is not None:
            model = copy.deepcopy(model)
            store_weights_8bit(model.model.diffusion_model, kind)
        start = time.process_time()
        results[label] = measure(model, inputs)
        finite = all(torch.isfinite(v).all() for v in results[label].values())
        print(f"  {label:22s} UNet bytes {unet_bytes(model) / 2**20:8.2f} MiB  finite {finite}  "
              f"{time.process_time() - start:.1f} s", flush=True)
        rows.append((label, unet_bytes(model)))
    table = [f"| {name} | variant | UNet weight bytes | vs fp32: UNet, eta 0, eta 1 | vs fp16: UNet, eta 0, eta 1 |",
             "|---|---|---|---|---|"]
    base = rows[0][1]
    for label, size in rows:
        errors = []
        for ref in ("fp32 (plain)", "fp16 (plain)"):
            if ref == label:
                errors.append("-")
                continue
            errors.append(", ".join(f"{rel_l2(results[label][k], results[ref][k]):.2e}" for k in results[label]))
        table.append(f"| | {label} | {size / 2**20:.2f} MiB ({size / base:.3f}) | {errors[0]} | {errors[1]} |")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,reduced")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--frames", type=int, default=4, help="0: the model's own (16 for reduced)")
    ap.add_argument("--latent", default="16x24", help="reduced model's latent HxW (pixels / 8)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.latent = tuple(int(v) for v in args.latent.split("x"))
    torch.set_num_threads(args.threads)
    print(describe_device(torch.device("cpu")))
    tables = [run_model(name, args) for name in args.models.split(",")]
    print()
    for table in tables:
        print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
