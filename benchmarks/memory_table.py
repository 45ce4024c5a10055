"""The README's table of peak memory per model and preset, from the memory estimate (dc_app/memory_estimate.py).

    python benchmarks/memory_table.py            # CUDA estimates (the CUDA context in the high end)
    python benchmarks/memory_table.py --cpu      # the same for a CPU (RAM)

Estimates only: nothing is allocated (the models are traced on the meta device), so this runs anywhere in a
minute. The measured figures next to them come from benchmarks/low_memory.py.
"""
from __future__ import annotations

import argparse

import _common  # noqa: F401  (puts the repository on sys.path)
from dc_app.memory_estimate import GiB, estimate_memory
from dc_app.loading.spec import load_model_config, model_spec
from dc_app.options import LOW_VRAM_FF_TOKENS, LOW_VRAM_PRESET

MODELS = ("256", "512", "1024", "512_interp", "tooncrafter_512")
PRESETS = {
    "default (fp32, batched CFG)": {},
    "--dtype bf16": dict(dtype="bf16"),
    "--low-vram": dict(dtype="bf16", offload=LOW_VRAM_PRESET["offload"], ff_chunk_size=LOW_VRAM_FF_TOKENS,
                       weights_dtype=LOW_VRAM_PRESET["weights_dtype"], cfg_mode=LOW_VRAM_PRESET["cfg_mode"],
                       decode_chunk_size=LOW_VRAM_PRESET["decode_chunk_size"]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="estimate for a CPU (RAM) instead of a GPU")
    ap.add_argument("--long", type=int, default=4, help="also N = this many times T frames for --low-vram")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    print(f"| model | frames | preset | estimated peak ({'RAM' if args.cpu else 'GPU'}) | peak phase |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        spec = model_spec(load_model_config(name))
        rows = [(spec.frames, preset) for preset in PRESETS]
        if not spec.interp and args.long > 1:
            rows.append((args.long * spec.frames, "--low-vram"))
        for frames, preset in rows:
            options = dict(PRESETS[preset])
            if spec.temporal_decoder:
                options.pop("decode_chunk_size", None)  # the preset leaves a temporal decoder its own chunk
            e = estimate_memory(name, frames=frames, device_type=device, **options)
            print(f"| {name} | {frames} | {preset} | {e.total[0] / GiB:.1f}-{e.total[1] / GiB:.1f} GiB | "
                  f"{e.peak_phase} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
