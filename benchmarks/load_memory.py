"""Peak RAM while loading a full-size checkpoint, divided by the checkpoint's tensor bytes.

    python benchmarks/load_memory.py [--model 512] [--dir /tmp/dc_app_bench] [--baseline]

Writes a synthetic checkpoint in the official layout (`{"state_dict": ...}`, float32, ~10.4 GB for 512)
once, then loads it with `dc_app.load_pretrained` in a fresh process and reads that process's peak RSS.
`--baseline` also measures the upstream way (build with random init, then `torch.load` + copy), which
needs about twice the checkpoint in RAM. Target for dc_app: <= 1.25. Not part of CI (disk and time).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WRITE = """
import sys, torch
sys.path.insert(0, {root!r})
from dc_app import build_model, load_model_config
meta = build_model(load_model_config({model!r}), device="meta").state_dict()
gen = torch.Generator().manual_seed(0)
sd = {{k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in meta.items()}}
torch.save({{"state_dict": sd}}, {path!r})
"""

LOAD_OURS = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from dc_app import load_pretrained
model = load_pretrained({model!r}, device="cpu", checkpoint={path!r})
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# mmap-backed weights are read lazily; touch every one, as a first generation would, before measuring.
n = 0
for t in model.state_dict().values():
    n += t.numel() * t.element_size()
    float(t.float().sum()) if t.numel() < 2**26 else float(t.sum())
print(json.dumps({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tensor_bytes": n,
                  "peak_rss_before_touch": after_load}}))
"""

LOAD_UPSTREAM_STYLE = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from dc_app import build_model, load_model_config
model = build_model(load_model_config({model!r}), device="cpu")   # random init, as upstream instantiates
sd = torch.load({path!r}, map_location="cpu", weights_only=True)["state_dict"]
model.load_state_dict(sd, strict=True)
n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tensor_bytes": n}}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="512")
    parser.add_argument("--dir", default="/tmp/dc_app_bench")
    parser.add_argument("--baseline", action="store_true", help="also measure build-random-then-load (~2x RAM)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for later runs")
    args = parser.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic_{args.model}.ckpt"
    need = 11 * 2**30 if args.model != "tiny" else 2**27
    if not path.exists():
        free = shutil.disk_usage(folder).free
        if free < need * 1.1:
            sys.exit(f"need ~{need / 2**30:.1f} GiB free in {folder}, have {free / 2**30:.1f} GiB")
        print(f"writing synthetic checkpoint {path} ...", flush=True)
        run(WRITE.format(root=str(ROOT), model=args.model, path=str(path)) + "\nprint('{}')")
    fmt = dict(root=str(ROOT), model=args.model, path=str(path))
    ours = run(LOAD_OURS.format(**fmt))
    size = ours["tensor_bytes"]
    print(f"checkpoint tensors: {size / 2**30:.2f} GiB")
    print(f"dc_app load_pretrained, before reading the weights: peak RSS {ours['peak_rss_before_touch'] / 2**30:.2f} GiB")
    print(f"dc_app load_pretrained, every weight read: peak RSS {ours['peak_rss'] / 2**30:.2f} GiB, ratio {ours['peak_rss'] / size:.3f}"
          f" (target <= 1.25)")
    if args.baseline:
        base = run(LOAD_UPSTREAM_STYLE.format(**fmt))
        print(f"random init + load:     peak RSS {base['peak_rss'] / 2**30:.2f} GiB, ratio {base['peak_rss'] / size:.3f}")
        print(f"dc_app / baseline: {ours['peak_rss'] / base['peak_rss']:.3f}")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
