"""Peak memory of a generation at each precision (fp32, fp16, bf16), each in a fresh process, vs fp32.

    python benchmarks/memory_precision.py                        # tiny model, full pipeline
    python benchmarks/memory_precision.py --models reduced --frames 8 --steps 1    # CPU, reduced width
    python benchmarks/memory_precision.py --models tiny,reduced,512                  # GPU

What is measured:
- on a GPU: torch.cuda.max_memory_allocated over the whole child process (weights + activations);
- on CPU: the child's peak RSS (getrusage ru_maxrss) minus its RSS just before the model is built, i.e. the
  bytes of the weights plus the activations of the run, without the Python/torch runtime itself (tracemalloc
  does not see torch's allocations). Weights are allocated directly in the chosen dtype (built on meta), so
  no float32 copy inflates the half-precision peaks.
What runs: "tiny" and the real sizes run the whole pipeline (run_synthesis: encoders, fixed DDIM with batched
CFG 7.5, per-frame VAE decode; the VAE stays float32). "reduced" (512 layout, model_channels 64) runs the
denoising loop only (UNet + sampler with batched CFG): its encoders and VAE would be full size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from _common import (DTYPES, current_rss, default_device, describe_device, model_config, random_model,
                     unet_inputs)
from dc_app.pipeline import run_synthesis
from dc_app.sampling import FixedDDIMSampler

MODELS = {"tiny": ("tiny", None, "pipeline"), "reduced": ("512", 64, "denoising"),
          "256": ("256", None, "pipeline"), "512": ("512", None, "pipeline"), "1024": ("1024", None, "pipeline")}


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg_name, channels, mode = MODELS[args.model]
    dtype = DTYPES[args.dtype]
    # Import the model code (open_clip included) and build the BPE tokenizer before the baseline: they are
    # runtime, not weights or activations.
    from dc_app.models import clip, diffusion  # noqa: F401

    clip._tokenizer()
    baseline = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = random_model(model_config(cfg_name, channels), device, unet_only=(mode == "denoising"), dtype=dtype)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type != "meta")
    frames = args.frames or model.temporal_length
    h, w = model.image_size
    if mode == "pipeline":
        g = torch.Generator().manual_seed(0)
        video = (torch.rand(1, 3, 1, 8 * h, 8 * w, generator=g) * 2 - 1).to(device)
        result = run_synthesis(model, "fixed", ["a cat playing piano"], video, (1, 4, frames, h, w),
                               ddim_steps=args.steps, unconditional_guidance_scale=7.5, guidance_rescale=0.7,
                               timestep_spacing="uniform_trailing", generator=torch.Generator(device).manual_seed(0))
        out = result.videos
    else:
        x_T, _, cond, fs = unet_inputs(model, 1, frames, device, seed=0)
        _, _, uncond, _ = unet_inputs(model, 1, frames, device, seed=1)
        out, _ = FixedDDIMSampler(model).sample(
            args.steps, 1, tuple(x_T.shape[1:]), conditioning=cond, eta=1.0, x_T=x_T,
            unconditional_guidance_scale=7.5, unconditional_conditioning=uncond, fs=fs,
            timestep_spacing="uniform_trailing", verbose=False, batched_cfg=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is in KiB
    print(json.dumps({"peak": peak, "weights": weights, "seconds": time.perf_counter() - start,
                      "finite": bool(torch.isfinite(out).all()), "frames": frames, "mode": mode}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny", help="comma list from " + ",".join(MODELS))
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--steps", type=int, default=3, help="DDIM steps (peak memory does not grow with steps)")
    ap.add_argument("--frames", type=int, default=None, help="frames (default: the model's temporal length)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or str(default_device())
    if args.child:
        child(args)
        return 0

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS - RSS before the build"
    print(f"device: {describe_device(device)}; peak memory = {what}; each run in a fresh process")
    for name in args.models.split(","):
        results = {}
        for dtype_name in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--child", "--model", name, "--dtype", dtype_name,
                   "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
            if args.frames:
                cmd += ["--frames", str(args.frames)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} {dtype_name}: failed\n{done.stderr[-2000:]}")
                continue
            results[dtype_name] = json.loads(done.stdout.strip().splitlines()[-1])
        if not results:
            continue
        first = next(iter(results.values()))
        print(f"\n{name}: {first['mode']}, {first['frames']} frames, {args.steps} steps, batched CFG 7.5:")
        base = results.get("fp32")
        for dtype_name, r in results.items():
            ratio = f"{r['peak'] / base['peak']:.3f}" if base else "n/a"
            print(f"  {dtype_name}: peak {r['peak'] / 2**20:9.1f} MiB (weights {r['weights'] / 2**20:8.1f} MiB), "
                  f"ratio vs fp32 {ratio}, finite {r['finite']}, {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
