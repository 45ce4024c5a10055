"""UNet forward: our fast path (SDPA attention) vs the plain-math attention path, same weights, same inputs.

    python benchmarks/unet_forward.py                          # CPU: tiny, then reduced width at 16 frames
    python benchmarks/unet_forward.py --models reduced --frames 4 --repeats 3   # a short CPU run
    python benchmarks/unet_forward.py --models tiny,reduced,512 --dtypes fp32,fp16,bf16   # GPU

Models: "tiny" (the test model, batch 2 as with batched CFG), "reduced" (the 512 layout with model_channels
64 at 320x512, batch 1), "256"/"512"/"1024" (real sizes, random weights: for a GPU). On CPU the default is
fp32 only; on a GPU fp32, fp16 and bf16. The issue's CPU target: ratio sdpa/math <= 1 for tiny and reduced.
Both paths compute the same attention (they agree within float rounding, see tests/test_fast_paths.py).
"""
from __future__ import annotations

import argparse

import torch

from _common import (DTYPES, default_device, describe_device, clock_for, interleaved, model_config,
                     random_model, report, unet_inputs)
from dc_app import load_pretrained
from dc_app.models.attention_kernel import attention_backend

# (config name, model_channels override, default batch)
MODELS = {"tiny": ("tiny", None, 2), "reduced": ("512", 64, 1), "256": ("256", None, 1),
          "512": ("512", None, 1), "1024": ("1024", None, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma list from " + ",".join(MODELS)
                    + " (default: tiny,reduced on CPU; tiny,reduced,512 on a GPU)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: fp32 on CPU, all on GPU)")
    ap.add_argument("--frames", type=int, default=None, help="frames (default: the model's temporal length)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default: 2 tiny, 1 otherwise)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see _common.py)")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="auto: CPU time on CPU, wall time on a GPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    names = (args.models or ("tiny,reduced,512" if on_gpu else "tiny,reduced")).split(",")
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if on_gpu else "fp32")).split(",")
    clock = clock_for(device, args.clock)
    print(f"device: {describe_device(device)}; clock: {'wall' if clock.__name__ == 'perf_counter' else 'CPU'} "
          f"time; {args.repeats} interleaved repeats after one warm-up")

    for name in names:
        cfg_name, channels, default_batch = MODELS[name]
        if name == "tiny":
            model = load_pretrained("tiny", device=device)
        else:
            model = random_model(model_config(cfg_name, channels), device, unet_only=True)
        frames = args.frames or model.temporal_length
        batch = args.batch or default_batch
        h, w = model.image_size
        for dtype_name in dtypes:
            model.set_dtype(DTYPES[dtype_name])
            x, t, cond, fs = unet_inputs(model, batch, frames, device)

            def forward(backend: str):
                def run():
                    with torch.no_grad(), attention_backend(backend):
                        return model.apply_model(x, t, cond, fs=fs)
                return run

            print(f"\n{name} UNet ({cfg_name} layout, model_channels "
                  f"{model.model.diffusion_model.model_channels}), {dtype_name}, batch {batch}, {frames} frames, "
                  f"latent {h}x{w}:")
            times = interleaved({"sdpa (fast path)": forward("sdpa"), "math (plain path)": forward("math")},
                                args.repeats, device, clock)
            report(times, baseline="math (plain path)", unit="ms")
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
