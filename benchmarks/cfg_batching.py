"""Classifier-free guidance: cond and uncond in one batched UNet call vs two calls (upstream), per sampler step.

    python benchmarks/cfg_batching.py                              # tiny model, CPU or GPU
    python benchmarks/cfg_batching.py --models tiny,reduced --frames 4 --steps 2 --repeats 3   # short CPU run
    python benchmarks/cfg_batching.py --models tiny,512 --dtype bf16   # GPU

Runs the fixed DDIM sampler (CFG 7.5, guidance rescale 0.7, eta 1) on random conditioning with the same
seeded noise for both variants; they give equal samples within float rounding (tests/test_fast_paths.py).
Batched CFG doubles the batch of each UNet call instead of making two calls: it pays off where a single
sample does not fill the device (GPUs), and costs twice the activation memory of one call.
"""
from __future__ import annotations

import argparse

import torch

from _common import (DTYPES, default_device, describe_device, clock_for, interleaved, model_config,
                     random_model, report, unet_inputs)
from dc_app import load_pretrained
from dc_app.sampling import FixedDDIMSampler

MODELS = {"tiny": ("tiny", None), "reduced": ("512", 64), "256": ("256", None), "512": ("512", None),
          "1024": ("1024", None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny", help="comma list from " + ",".join(MODELS))
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="UNet dtype (default fp32 CPU, bf16 GPU)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per run")
    ap.add_argument("--frames", type=int, default=None, help="frames (default: the model's temporal length)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see _common.py)")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    clock = clock_for(device, args.clock)
    print(f"device: {describe_device(device)}; clock: {'wall' if clock.__name__ == 'perf_counter' else 'CPU'} "
          f"time; {args.repeats} interleaved repeats after one warm-up; {args.steps} steps per run")

    for name in args.models.split(","):
        cfg_name, channels = MODELS[name]
        if name == "tiny":
            model = load_pretrained("tiny", device=device)
        else:
            model = random_model(model_config(cfg_name, channels), device, unet_only=True)
        model.set_dtype(DTYPES[dtype_name])
        frames = args.frames or model.temporal_length
        x_T, _, cond, fs = unet_inputs(model, 1, frames, device, seed=0)
        _, _, uncond, _ = unet_inputs(model, 1, frames, device, seed=1)
        uncond["c_concat"] = cond["c_concat"]  # upstream's uncond shares the image latents
        sampler = FixedDDIMSampler(model)

        def run(batched: bool):
            def sample():
                gen = torch.Generator(device=device).manual_seed(2)
                out, _ = sampler.sample(args.steps, 1, tuple(x_T.shape[1:]), conditioning=cond, eta=1.0,
                                        x_T=x_T, unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                        fs=fs, timestep_spacing="uniform_trailing", guidance_rescale=0.7,
                                        verbose=False, generator=gen, batched_cfg=batched)
                return out
            return sample

        h, w = model.image_size
        print(f"\n{name} ({cfg_name} layout, model_channels {model.model.diffusion_model.model_channels}), "
              f"{dtype_name} UNet, 1 sample, {frames} frames, latent {h}x{w}, seconds per {args.steps}-step run:")
        times = interleaved({"batched (one call)": run(True), "two calls (upstream)": run(False)},
                            args.repeats, device, clock)
        report(times, baseline="two calls (upstream)")
        del model, sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
