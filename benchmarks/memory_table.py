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
from dc_app.options import low_vram_preset

MODELS = ("256", "512", "1024", "512_interp", "tooncrafter_512")
PRESETS = ("default (fp32, batched CFG)", "--dtype bf16", "--low-vram")


def preset_options(preset: str, model: str, device: str) -> dict:
    """estimate_memory's keyword arguments for a row's preset (--low-vram: the options' own preset)."""
    if preset == "--dtype bf16":
        return dict(dtype="bf16")
    if preset == "--low-vram":
        options = low_vram_preset(model, device)  # a temporal decoder keeps its own decode chunk
        options["ff_chunk_size"] = options["ff_chunk_size"].tokens
        return options
    return {}


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
            e = estimate_memory(name, frames=frames, device_type=device, **preset_options(preset, name, device))
            print(f"| {name} | {frames} | {preset} | {e.total[0] / GiB:.1f}-{e.total[1] / GiB:.1f} GiB | "
                  f"{e.peak_phase} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
