"""Sampler overhead: fixed vs stock DDIM, and the NaN watchdog on vs off, timed interleaved in one process.

    python benchmarks/sampler_overhead.py                 # stand-in denoiser (512-sized latents on GPU)
    python benchmarks/sampler_overhead.py --model tiny    # the tiny DynamiCrafter (random weights), if importable

Both samplers run the same step code; fixed differs only in how it builds its schedule (cached), and the
watchdog adds three on-device reductions per step and one host sync per run. Each repeat runs every variant
once, in a rotating order, so drift in machine load hits all of them alike; the ratios are printed for
medians and for best times (on a busy machine noise only ever adds time). The
target is <= 1.02 for both. The stand-in denoiser costs far less than a real UNet, so its ratios overstate
the sampler's share of a real run; the absolute watchdog cost per step is printed too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dc_app.sampling import DDIMSampler, FixedDDIMSampler  # noqa: E402
from dc_app.schedule import config_tables  # noqa: E402


class StandInDenoiser(torch.nn.Module):
    """A deterministic v-prediction stand-in with the apply_model interface and the 512 model's schedule: a
    small random Conv3d body (4 -> 16 -> 4 channels, 3x3x3) plus a time-dependent term and terms in the
    conditioning. Far cheaper than a UNet, but a network, so the sampler's own cost is seen in proportion."""

    parameterization = "v"
    num_timesteps = 1000
    use_dynamic_rescale = True
    rescale_betas_zero_snr = True
    linear_start, linear_end, base_scale = 0.00085, 0.012, 0.7
    default_timestep_spacing = "uniform_trailing"

    def __init__(self, device: torch.device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(16, 4, 3, padding=1),
        )
        for param in self.body.parameters():
            param.data = torch.randn(param.shape, generator=g) * 0.05
        self.register_buffer("bias", torch.randn(1, 4, 1, 1, 1, generator=g) * 0.3)
        tables = config_tables(self.linear_start, self.linear_end, 1000, True, self.base_scale)
        for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
            self.register_buffer(name, getattr(tables, name).clone())
        self.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.bias.device

    def apply_model(self, x, t, cond, **kw):
        time_term = torch.sin(t.to(torch.float32) / 137.0).view(-1, 1, 1, 1, 1) * self.bias
        ctx = cond["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(self.body(x)) + time_term + 0.1 * ctx + 0.05 * cond["c_concat"][0]


def tiny_model(device: torch.device):
    """The tiny DynamiCrafter and conditioning of its shapes, or None (with the reason) if unavailable."""
    try:
        import dc_app

        try:
            model = dc_app.load_pretrained("tiny", device=device)
        except Exception:  # noqa: BLE001 - fall back to a randomly initialised build
            model = dc_app.build_model(dc_app.load_model_config("tiny"), device=device)
        p = model.config.model.params
        context_dim = int(p.unet_config.params.context_dim)
        shape = (model.channels, model.temporal_length, *model.image_size)
        return model, shape, 77 + 16 * model.temporal_length, context_dim, None
    except Exception as e:  # noqa: BLE001 - any failure means: use the stand-in
        return None, None, None, None, f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("standin", "tiny"), default="standin")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 40 stand-in, 12 tiny)")
    ap.add_argument("--steps", type=int, default=None,
                    help="DDIM steps S (default: 10 stand-in, 5 tiny; both finite for stock too)")
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: with busy cores, multi-threaded small ops time erratically)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 12 if args.model == "tiny" else 40
    if args.steps is None:
        args.steps = 5 if args.model == "tiny" else 10
    torch.manual_seed(0)

    # the 512 model's latent on a GPU; a quarter of it on CPU, to stay under a minute
    shape = (4, 16, 40, 64) if device.type == "cuda" else (4, 16, 20, 32)
    model, ctx_len, ctx_dim = None, 77 + 16 * 16, 64
    if args.model == "tiny":
        model, t_shape, t_len, t_dim, why = tiny_model(device)
        if model is None:
            print(f"note: the tiny model is not available ({why}); using the stand-in denoiser instead")
        else:
            shape, ctx_len, ctx_dim = t_shape, t_len, t_dim
    if model is None:
        model = StandInDenoiser(device)
    label = type(model).__name__

    b = 1
    concat = torch.randn(b, *shape, device=device)
    cond = {"c_concat": [concat], "c_crossattn": [torch.randn(b, ctx_len, ctx_dim, device=device)]}
    uncond = {"c_concat": [concat], "c_crossattn": [torch.randn(b, ctx_len, ctx_dim, device=device)]}
    fs = torch.full((b,), 24, dtype=torch.long, device=device)
    spacing = getattr(model, "default_timestep_spacing", "uniform_trailing")
    variants = {
        ("stock", True): DDIMSampler(model), ("fixed", True): FixedDDIMSampler(model),
        ("stock", False): DDIMSampler(model), ("fixed", False): FixedDDIMSampler(model),
    }

    # On CPU the process's CPU time (one thread): on a shared machine wall time mostly measures the other
    # processes. On a GPU, wall time between synchronisations.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def one_run(key) -> float:
        sampler = variants[key]
        gen = torch.Generator(device=device).manual_seed(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        out, _ = sampler.sample(args.steps, b, shape, conditioning=cond, eta=args.eta,
                                unconditional_guidance_scale=7.5, unconditional_conditioning=uncond, fs=fs,
                                timestep_spacing=spacing, guidance_rescale=0.7, verbose=False, generator=gen,
                                watchdog=key[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = clock() - t0
        if not bool(out.isfinite().all()):
            raise SystemExit(f"{key[0]} sampler gave non-finite output at S={args.steps}; pick another --steps")
        return elapsed

    keys = list(variants)
    for key in keys:  # warm-up
        one_run(key)
    times = {key: [] for key in keys}
    for r in range(args.repeats):
        for j in range(len(keys)):
            key = keys[(r + j) % len(keys)]
            times[key].append(one_run(key))
    med = {key: statistics.median(v) for key, v in times.items()}
    best = {key: min(v) for key, v in times.items()}  # noise from other processes only ever adds time

    print(f"model: {label}, device: {device}, latent {b}x{'x'.join(map(str, shape))}, S={args.steps}, "
          f"eta={args.eta}, {spacing}, CFG 7.5 batched, rescale 0.7, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} CPU thread(s), {'wall' if device.type == 'cuda' else 'CPU'} time")
    for key in keys:
        print(f"  {key[0]:5s} watchdog={'on ' if key[1] else 'off'}  median {med[key] * 1e3:9.3f} ms/run, "
              f"best {best[key] * 1e3:9.3f} ms/run ({med[key] / args.steps * 1e3:.3f} ms/step)")
    for name, stat in (("median", med), ("best", best)):
        fixed_vs_stock = stat[("fixed", True)] / stat[("stock", True)]
        watchdog = stat[("fixed", True)] / stat[("fixed", False)]
        per_step = (stat[("fixed", True)] - stat[("fixed", False)]) / args.steps * 1e6
        print(f"{name:6s}  fixed / stock (watchdog on): {fixed_vs_stock:.4f}   watchdog on / off (fixed): "
              f"{watchdog:.4f} ({per_step:+.0f} us/step)   target <= 1.02")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
