"""Low-memory options: peak memory with feed-forward chunking (and 8-bit weights) vs the plain path, next to
the memory estimate's prediction (dc_app/memory_estimate.py). Every variant runs in a fresh process.

    python benchmarks/low_memory.py                 # CPU, reduced width (default): one UNet forward
    python benchmarks/low_memory.py --real-width    # CPU, full-width 512 UNet, batch 2, bf16 (tens of minutes)
    python benchmarks/low_memory.py --gpu           # GPU (auto when CUDA is available): 512 and 1024 generations

What is measured:
- CPU: the child's peak RSS during one UNet forward minus its RSS just before it (model and inputs built; the
  peak is reset with /proc/self/clear_refs, so the build's own peak does not count), with
  MALLOC_MMAP_THRESHOLD_=65536 so that freed activations leave the RSS (see long_video.py). This is the
  activation increment; the estimate's column is its UNet activations (low-high) for the same call.
  `--real-width` measures from before the build instead (weights + activations), against the estimate's
  weights + activations.
- GPU: torch.cuda.max_memory_allocated over a whole seeded random-weight generation (5 steps: peak memory
  does not depend on the step count), and the median seconds per step, low-memory options vs the defaults
  (fp32, batched CFG, nothing offloaded, unchunked).
Outputs are compared with the plain fp32 path's (max abs difference; half precision differs by its rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import DTYPES, current_rss, describe_device, model_config, random_model, unet_inputs
from dc_app.memory_estimate import estimate_memory, weight_bytes

MiB = 2**20
# The CPU variants: (name, dtype, feed-forward chunk in tokens or None, 8-bit weights or None).
CPU_VARIANTS = (("fp32 plain", "fp32", None, None), ("fp32 chunked", "fp32", 4096, None),
                ("bf16 plain", "bf16", None, None), ("bf16 chunked", "bf16", 4096, None))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_child(args) -> None:
    """One UNet forward in this fresh process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    width = None if args.real_width else 64
    cfg = model_config("512", width)
    dtype = DTYPES[args.dtype]
    before_build = current_rss()
    model = random_model(cfg, torch.device("cpu"), unet_only=True, dtype=dtype)
    if args.weights_8bit:
        from dc_app.models.weight_storage import store_weights_8bit

        store_weights_8bit(model.model.diffusion_model, args.weights_8bit)
    if args.chunk:
        model.set_ff_chunk_size(tokens=args.chunk)
    x, t, cond, fs = unet_inputs(model, args.batch, args.frames, torch.device("cpu"), seed=0)
    reset = reset_peak_rss()
    before = current_rss()
    start = time.process_time()
    with torch.no_grad():
        out = model.apply_model(x, t, cond, fs=fs)
    seconds = time.process_time() - start
    peak = peak_rss()
    torch.save(out, args.out)
    print(json.dumps({"increment": peak - before, "from_build": peak - before_build, "reset": reset,
                      "seconds": seconds, "finite": bool(torch.isfinite(out).all())}))


def estimate_for(cfg, variant, batch: int, frames: int):
    _, dtype, chunk, weights_8bit = variant
    cfg_mode = "batched" if batch == 2 else "two-call"
    return estimate_memory(cfg, frames=frames, dtype=dtype, weights_dtype=weights_8bit, ff_chunk_size=chunk,
                           cfg_mode=cfg_mode, device_type="cpu")


def run_cpu(args) -> None:
    torch.set_num_threads(args.threads)
    width = None if args.real_width else 64
    if args.real_width:
        variants = [("bf16 low-memory", "bf16", 4096, "int8")]  # --low-vram's 8-bit storage
        batch, frames = 2, 16
    else:
        variants = list(CPU_VARIANTS)
        batch, frames = 1, args.frames
    cfg = model_config("512", width)
    if frames != cfg.model.params.unet_config.params.temporal_length:
        raise SystemExit("the UNet forward runs the model's trained 16 frames (the estimate's window)")
    print(f"device: {describe_device(torch.device('cpu'))}; {'512 full width' if width is None else 'reduced width'}"
          f", 320x512, {frames} frames, batch {batch}; peak RSS increment, each variant in a fresh process")
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            name, dtype, chunk, weights_8bit = variant
            out = str(Path(tmp) / f"{len(results)}.pt")
            cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--frames", str(frames), "--batch",
                   str(batch), "--threads", str(args.threads), "--out", out]
            cmd += ["--chunk", str(chunk)] if chunk else []
            cmd += ["--weights-8bit", weights_8bit] if weights_8bit else []
            cmd += ["--real-width"] if args.real_width else []
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            outputs[name] = torch.load(out)
    base = results.get(variants[0][0])
    for variant in variants:
        name = variant[0]
        if name not in results:
            continue
        r = results[name]
        e = estimate_for(cfg, variant, batch, frames)
        if args.real_width:
            # The child builds the UNet only: its weights (8-bit where asked) + one forward's activations.
            unet = weight_bytes(cfg, dtype=variant[1], weights_dtype=variant[3])["model"]
            measured, low, high = r["from_build"], unet + e.unet_activations[0], unet + e.unet_activations[1]
            what = "UNet weights + activations"
        else:
            measured, (low, high) = r["increment"], e.unet_activations
            what = "activations"
        ratio = f", ratio vs {variants[0][0]} {measured / base['increment']:.3f}" if base and not args.real_width else ""
        diff = ""
        if len(variants) > 1 and variants[0][0] in outputs:
            diff = f"max |out - {variants[0][0]}| {(outputs[name] - outputs[variants[0][0]]).abs().max().item():.2e}; "
        print(f"  {name:16s} {what} {measured / MiB:8.1f} MiB{ratio}; estimate {low / MiB:.1f}-{high / MiB:.1f} MiB "
              f"(measured / low {measured / low:.3f}); {diff}"
              f"{r['seconds']:.1f} s CPU; finite {r['finite']}" + ("" if r["reset"] else " (peak not reset)"))


# ---------------------------------------------------------------------------------------------------- GPU
GPU_VARIANTS = ("default", "low-memory")


def gpu_child(args) -> None:
    """One seeded random-weight generation on the GPU in this fresh process; prints a JSON line."""
    from dc_app.pipeline import image_video, run_synthesis

    device = torch.device("cuda")
    low = args.variant == "low-memory"
    dtype = torch.bfloat16 if low and torch.cuda.is_bf16_supported() else (torch.float16 if low else torch.float32)
    model = random_model(model_config(args.model), device, dtype=dtype)
    if low:  # --low-vram: 8-bit UNet weights, encoders and VAE offloaded, chunked transformer blocks
        from dc_app.models.weight_storage import store_weights_8bit

        store_weights_8bit(model.model.diffusion_model, "int8")
        model.enable_offload(vae=True)
        model.set_ff_chunk_size(tokens=4096)
    torch.cuda.empty_cache()
    h, w = model.image_size
    frames = model.temporal_length
    g = torch.Generator().manual_seed(0)
    video = image_video(torch.rand(3, 8 * h, 8 * w, generator=g) * 2 - 1, frames)
    stamps = []

    def on_step(*_):
        torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize(device)
    stamps.append(time.perf_counter())
    result = run_synthesis(model, "fixed", ["a cat playing piano"], video, (1, 4, frames, h, w),
                           ddim_steps=args.steps, unconditional_guidance_scale=7.5, guidance_rescale=0.7,
                           timestep_spacing="uniform_trailing", generator=torch.Generator(device).manual_seed(0),
                           callback=on_step, batched_cfg=not low, decode_chunk_size=1 if low else None)
    torch.cuda.synchronize(device)
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first interval includes the encoders
    print(json.dumps({"peak": torch.cuda.max_memory_allocated(device), "dtype": str(dtype).split(".")[-1],
                      "weights_8bit": "int8" if low else None, "step_seconds": statistics.median(steps) if steps else None,
                      "finite": bool(torch.isfinite(result.videos).all())}))


def run_gpu(args) -> None:
    print(f"device: {describe_device(torch.device('cuda'))}; {args.steps} steps, CFG 7.5, seeded random weights; "
          "peak = torch.cuda.max_memory_allocated; each run in a fresh process")
    for name in args.models.split(","):
        results = {}
        for variant in GPU_VARIANTS:
            cmd = [sys.executable, __file__, "--gpu-child", "--model", name, "--variant", variant,
                   "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} {variant}: failed\n{done.stderr[-2000:]}")
                continue
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        for variant, r in results.items():
            low = variant == "low-memory"
            e = estimate_memory(name, dtype=r["dtype"].replace("bfloat16", "bf16").replace("float16", "fp16")
                                .replace("float32", "fp32"), weights_dtype=r["weights_8bit"],
                                ff_chunk_size=4096 if low else None, cfg_mode="two-call" if low else "batched",
                                decode_chunk_size=1 if low else None, offload="all" if low else "none")
            context = e.total[1] - max(p.total[1] for p in e.phases)  # max_memory_allocated has no CUDA context
            base = results.get("default")
            time_ratio = (f", time per step vs default {r['step_seconds'] / base['step_seconds']:.2f}"
                          if base and base["step_seconds"] and r["step_seconds"] else "")
            print(f"  {name} {variant:10s} ({r['dtype']}, 8-bit weights {r['weights_8bit']}): peak "
                  f"{r['peak'] / 2**30:.2f} GiB; estimate {e.total[0] / 2**30:.2f}-{(e.total[1] - context) / 2**30:.2f}"
                  f" GiB without context; {r['step_seconds']:.3f} s/step{time_ratio}; finite {r['finite']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real-width", action="store_true", help="CPU: the full-width 512 UNet, batch 2, bf16 (slow)")
    ap.add_argument("--gpu", action="store_true", help="GPU rows (default when CUDA is available)")
    ap.add_argument("--cpu", action="store_true", help="CPU rows even when CUDA is available")
    ap.add_argument("--models", default="512,1024", help="GPU: comma list of 512, 1024")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    for hidden in ("--child", "--gpu-child"):
        ap.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--dtype", "--chunk", "--weights-8bit", "--out", "--model", "--variant", "--batch"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.chunk = int(args.chunk) if args.chunk else None
        args.batch = int(args.batch)
        cpu_child(args)
    elif args.gpu_child:
        gpu_child(args)
    elif (args.gpu or torch.cuda.is_available()) and not args.cpu and not args.real_width:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here")
            return 1
        run_gpu(args)
    else:
        run_cpu(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
