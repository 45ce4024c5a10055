"""End-to-end seconds and peak VRAM of a generation at the real sizes (256, 512, 1024), random weights, on CUDA.

    python benchmarks/gpu_end_to_end.py                         # 256, 512, 1024: bf16 UNet, batched CFG
    python benchmarks/gpu_end_to_end.py --models 512 --baseline # also fp32 with two-call CFG, interleaved
    python benchmarks/gpu_end_to_end.py --models 1024 --offload --decode-chunk-size 4

One generation = run_synthesis from an image tensor and a prompt to the decoded video tensor on the GPU:
text and image encoders, 50 fixed-DDIM steps with CFG 7.5 (guidance rescale 0.7), VAE decode (float32 VAE
unless --vae-dtype). Weights are random (speed does not depend on their values), allocated directly in the
chosen dtype. Each size gets one untimed warm-up run, then --repeats timed runs per variant, interleaved.
Issue 7's stretch targets on an H100: 512 in <= 3.5 s with peak VRAM <= 10 GB, 1024 in <= 12 s.
Needs CUDA: exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import DTYPES, PIXEL_SIZES, describe_device, model_config, random_model
from dc_app.pipeline import run_synthesis

TARGETS = {"512": (3.5, 10.0), "1024": (12.0, None)}  # (seconds, GB) on an H100


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="256,512,1024")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="UNet and CLIP dtype")
    ap.add_argument("--vae-dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant after one warm-up")
    ap.add_argument("--baseline", action="store_true", help="also time fp32 with two-call CFG (upstream's way)")
    ap.add_argument("--two-call", action="store_true", help="also time --dtype with two-call CFG")
    ap.add_argument("--offload", action="store_true", help="encoders (and VAE) on CPU between uses")
    ap.add_argument("--decode-chunk-size", type=int, default=None, help="frames per VAE decode (default: model's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (first run compiles)")
    # A smoke test of this script without a GPU: --device cpu --models tiny --steps 2 (no VRAM figures).
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_end_to_end.py needs a CUDA GPU and none is available here; "
                 "for CPU figures run unet_forward.py, cfg_batching.py or memory_precision.py")
    on_gpu = device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 variants: TF32 tensor cores, as any fp32 deployment would
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {describe_device(device)}; {args.steps} steps, CFG 7.5, rescale 0.7; "
          f"VAE {args.vae_dtype}; offload {args.offload}; decode chunk {args.decode_chunk_size}; "
          f"compile {args.compile}")

    variants = {f"{args.dtype} batched CFG": (DTYPES[args.dtype], True)}
    if args.two_call:
        variants[f"{args.dtype} two-call CFG"] = (DTYPES[args.dtype], False)
    if args.baseline:
        variants["fp32 two-call CFG (upstream)"] = (torch.float32, False)

    for name in args.models.split(","):
        start = time.perf_counter()
        model = random_model(model_config(name), device, dtype=DTYPES[args.dtype])
        if args.offload:
            model.enable_offload(vae=True)
        if args.compile:
            model.compile_unet()
        build_s = time.perf_counter() - start
        height, width = PIXEL_SIZES[name]
        h, w = model.image_size
        frames = model.temporal_length
        image = torch.rand(1, 3, 1, height, width, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

        def generate(dtype: torch.dtype, batched: bool) -> float:
            model.set_dtype(dtype, vae_dtype=DTYPES[args.vae_dtype])  # a no-op when already in that dtype
            sync()
            t0 = time.perf_counter()
            result = run_synthesis(model, "fixed", ["a cat playing piano"], image, (1, 4, frames, h, w),
                                   ddim_steps=args.steps, unconditional_guidance_scale=7.5, guidance_rescale=0.7,
                                   timestep_spacing="uniform_trailing", batched_cfg=batched,
                                   decode_chunk_size=args.decode_chunk_size,
                                   generator=torch.Generator(device).manual_seed(0))
            sync()
            elapsed = time.perf_counter() - t0
            if result.nonfinite is not None:
                print(f"  note: non-finite values at {result.nonfinite} (random weights); timing still valid")
            return elapsed

        print(f"\n{name}: {height}x{width}, {frames} frames (latent {h}x{w}); random weights built in {build_s:.0f} s")
        warm = time.perf_counter()
        generate(*next(iter(variants.values())))
        print(f"  warm-up run: {time.perf_counter() - warm:.2f} s")
        times = {v: [] for v in variants}
        peaks = {v: 0 for v in variants}
        names = list(variants)
        for r in range(args.repeats):
            for j in range(len(names)):
                v = names[(r + j) % len(names)]
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                times[v].append(generate(*variants[v]))
                if on_gpu:
                    peaks[v] = max(peaks[v], torch.cuda.max_memory_allocated(device))
        first = names[0]
        for v in names:
            med = statistics.median(times[v])
            line = f"  {v:30s} median {med:7.2f} s, best {min(times[v]):7.2f} s"
            if on_gpu:
                line += f", peak VRAM {peaks[v] / 1e9:6.2f} GB ({peaks[v] / 2**30:.2f} GiB)"
            if v != first:
                line += f"; {first} is {med / statistics.median(times[first]):.2f}x as fast (medians)"
            print(line)
        target = TARGETS.get(name)
        if target:
            seconds, gb = target
            med = statistics.median(times[first])
            verdict = f"target <= {seconds} s: {'met' if med <= seconds else 'not met'}"
            if gb:
                verdict += f"; <= {gb} GB: {'met' if peaks[first] / 1e9 <= gb else 'not met'}"
            print(f"  {first}: {verdict} (targets are for an H100)")
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
