"""Long videos: time and UNet peak memory of one windowed denoiser evaluation at N = T, 2T, 4T, 8T, vs N = T.

    python benchmarks/long_video.py                                # CPU: reduced width, 320x512, 16 frames
    python benchmarks/long_video.py --latent 24x40 --repeats 3     # a shorter CPU run (192x320)
    python benchmarks/long_video.py --model 512 --device cuda      # GPU, the real 512 UNet

Each N runs in a fresh process: `WindowedModel.apply_model` over an N-frame latent (what every sampler step
calls, once per CFG branch; batch 1, default stride T/4, one window per UNet call), after one untimed T-frame
UNet call (first-call set-up). N = T is evaluated `--repeats` times, longer N proportionally fewer times (at
least once), so that every N costs about the same.
- Time: the process's CPU time per evaluation (one torch thread; wall time between synchronisations on a
  GPU). Windowed denoising should cost time in proportion to the number of windows (4N/T - 3): the script
  prints time(N) / time(T) next to windows(N) / windows(T).
- Memory: on CPU the child's peak RSS minus its RSS once the model and the N-frame inputs exist, i.e. the
  UNet's activations plus the N-frame output buffer (the latent and context inputs are not counted; the
  output buffer is, which only makes the ratio larger). On a GPU torch.cuda.max_memory_allocated minus the
  memory allocated before the call. The target: at 8T at most 1.2x the figure at N = T.
  On CPU the children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every block of 64 KiB or more
  (every activation) with its own mapping and unmaps it when freed, so RSS follows the live tensor bytes
  instead of the heap's fragmentation, which otherwise grows with the number of calls, not with N.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys

import torch

from _common import (clock_for, current_rss, default_device, describe_device, model_config, random_model, timed,
                     unet_inputs)
from dc_app.windowed_model import WindowedModel
from dc_app.windows import window_count

MODELS = {"reduced": ("512", 64), "512": ("512", None), "tiny": ("tiny", None)}


def child(args) -> None:
    """One N in this (fresh) process; prints a JSON line."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg_name, channels = MODELS[args.model]
    cfg = model_config(cfg_name, channels)
    if args.latent:
        cfg.model.params.image_size = [int(v) for v in args.latent.split("x")]
    model = random_model(cfg, device, unet_only=True)
    window = model.temporal_length
    frames = args.multiple * window
    x, t, cond, fs = unet_inputs(model, 1, frames, device, seed=0)
    # The image context of a T-frame clip, as every window gets it (unet_inputs makes one per input frame).
    cond["c_crossattn"] = [cond["c_crossattn"][0][:, : 77 + 16 * window]]
    windowed = WindowedModel(model, frames)
    clock = clock_for(device)
    repeats = max(1, math.ceil(args.repeats / windowed.layout.count))

    def evaluate():
        with torch.no_grad():
            return windowed.apply_model(x, t, cond, fs=fs)

    with torch.no_grad():  # warm-up: one window, as each evaluation's UNet calls are
        model.apply_model(x[:, :, :window], t, {"c_concat": [cond["c_concat"][0][:, :, :window]],
                                                "c_crossattn": cond["c_crossattn"]}, fs=fs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss()
    seconds = [timed(evaluate, device, clock) for _ in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB
    print(json.dumps({"frames": frames, "window": window, "windows": windowed.layout.count,
                      "unet_calls": windowed.unet_calls, "seconds": seconds, "peak": peak,
                      "latent": list(model.image_size)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reduced", choices=sorted(MODELS))
    ap.add_argument("--multiples", default="1,2,4,8", help="N / T values (default 1,2,4,8)")
    ap.add_argument("--latent", default=None, help="latent HxW (default: the model's, 40x64 for 512)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="evaluations timed at N = T (longer N: proportionally fewer, at least 1)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--multiple", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or str(default_device())
    if args.child:
        child(args)
        return 0

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device: {describe_device(device)}; model {args.model}, latent {args.latent or 'default'}; "
          f"each N in a fresh process, {args.repeats} timed evaluation(s) at N = T")
    results = []
    for multiple in (int(m) for m in args.multiples.split(",")):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--multiple", str(multiple),
               "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
        if args.latent:
            cmd += ["--latent", args.latent]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"N = {multiple}T: failed\n{done.stderr[-2000:]}")
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  N = {r['frames']:4d}: {r['windows']:3d} windows, {len(r['seconds'])} evaluation(s), median {statistics.median(r['seconds']):8.2f} s, "
              f"peak {r['peak'] / 2**20:8.1f} MiB", flush=True)

    base = results[0]
    base_time = statistics.median(base["seconds"])
    print(f"\nratios to N = T = {base['frames']} (latent {base['latent'][0]}x{base['latent'][1]}):")
    print("  N      windows  windows ratio  time ratio  time per window ratio  peak memory ratio")
    for r in results:
        assert r["windows"] == window_count(r["frames"], r["window"])
        time_ratio = statistics.median(r["seconds"]) / base_time
        window_ratio = r["windows"] / base["windows"]
        print(f"  {r['frames']:<6d} {r['windows']:7d}  {window_ratio:13.1f}  {time_ratio:10.2f}  "
              f"{time_ratio / window_ratio:21.3f}  {r['peak'] / base['peak']:17.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
