"""Shared pieces of the performance benchmarks: random-weight models at any size, interleaved timing, reports.

Timing rule for every benchmark: all variants are measured in the same process, each repeat runs every
variant once in a rotating order (so drift in machine load or clocks hits all of them alike), and ratios are
printed for medians and for best times (on a busy machine, noise only ever adds time). On CPU the clock is
the process's CPU time with one thread by default: on a shared machine, wall time mostly measures the other
processes, and multi-threaded small ops stall whenever a sibling thread is descheduled. On a GPU the clock is
wall time between synchronisations.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dc_app import build_model, load_model_config  # noqa: E402
from dc_app.models.random_init import randomize_parameters  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Pixel size of each model's videos (height, width); every released model makes 16 frames.
PIXEL_SIZES = {"tiny": (64, 64), "256": (256, 256), "512": (320, 512), "1024": (576, 1024)}


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def model_config(name: str, model_channels: int | None = None):
    """An upstream-schema config; `model_channels` narrows the UNet ("reduced width": 64 with the 512 layout)."""
    cfg = load_model_config(name)
    if model_channels is not None:
        cfg.model.params.unet_config.params.model_channels = int(model_channels)
    return cfg


def random_model(cfg, device: torch.device, unet_only: bool = False, seed: int = 0,
                 dtype: torch.dtype | None = None):
    """A DynamiCrafter with seeded random weights, built on the meta device and materialised on `device`.

    `unet_only`: only the UNet (and the schedule) get memory; the encoders and the VAE stay on meta, which is
    all a sampler or a UNet benchmark needs, and saves building ~1 B CLIP parameters on a CPU. Speed does not
    depend on the weights' values; randomize_parameters' recipe keeps activations in a sane range (with the
    tiny config and seed 0 it gives exactly load_pretrained("tiny")'s weights). `dtype` (set_dtype's rules:
    VAE float32) is applied on meta, so the weights are allocated in it and never exist in float32 at once.
    """
    model = build_model(cfg, device="meta")
    if dtype is not None:
        model.set_dtype(dtype)
    parts = [model.model] if unet_only else [model]
    for part in parts:
        part.to_empty(device=device)
        randomize_parameters(part, seed=seed)
    # to_empty leaves buffers uninitialised: recompute the DDPM schedule on the device (the same float64 ->
    # float32 computation as a fresh build) and, for a full model, the CLIP buffers a checkpoint lacks.
    with torch.device(device):
        model._register_schedule()
    if not unet_only:
        model.reset_nonpersistent_buffers(device)
    return model.eval().requires_grad_(False)


def unet_inputs(model, batch: int, frames: int, device: torch.device, seed: int = 0):
    """Random (x, t, cond, fs) for apply_model at the model's latent size, with a per-frame image context."""
    g = torch.Generator().manual_seed(seed)
    p = model.config.model.params
    h, w = model.image_size
    context_dim = int(p.unet_config.params.context_dim)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cond = {"c_concat": [rand(batch, 4, frames, h, w)], "c_crossattn": [rand(batch, 77 + 16 * frames, context_dim)]}
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    fs = torch.full((batch,), 24, dtype=torch.long, device=device)
    return rand(batch, 4, frames, h, w), t, cond, fs


def clock_for(device: torch.device, clock: str = "auto") -> Callable[[], float]:
    if clock == "wall" or (clock == "auto" and device.type == "cuda"):
        return time.perf_counter
    return time.process_time


def timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                clock: Callable[[], float], warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed rounds, then `repeats` rotating rounds."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            times[name].append(timed(variants[name], device, clock))
    return times


def report(times: dict[str, list[float]], baseline: str, unit: str = "s") -> dict[str, tuple[float, float]]:
    """Print median/best of each variant and its ratio to `baseline`; returns {name: (median ratio, best ratio)}."""
    scale = {"s": 1.0, "ms": 1e3}[unit]
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratios = {}
    for name in times:
        ratios[name] = (med[name] / med[baseline], best[name] / best[baseline])
        print(f"  {name:28s} median {med[name] * scale:10.3f} {unit}  best {best[name] * scale:10.3f} {unit}  "
              f"ratio vs {baseline}: median {ratios[name][0]:.3f}, best {ratios[name][1]:.3f}")
    return ratios
