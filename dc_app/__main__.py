"""Command line: `python -m dc_app generate ...` for one image, `python -m dc_app batch ...` for many, and
`python -m dc_app estimate ...` for the memory a generation would need, without loading anything.

Both call the same `dc_app.service.Service` methods as the Gradio UI and API, so a video made here has the same
validation, report and JSON sidecar as one made in the browser.

For several GPUs, start one process per GPU with torchrun; each process takes the batch items
`RANK::WORLD_SIZE` (environment variables set by torchrun) and runs on GPU `LOCAL_RANK`:

    torchrun --nproc_per_node=4 -m dc_app batch --input prompts.csv --out-dir outputs/batch --model 1024
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .loading.spec import MODEL_NAMES
from .options import add_performance_options, model_options, service_options, settle_performance_options
from .settings import FIELDS, add_cli_flags, cli_values

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ arguments
def _sampling_options(p: argparse.ArgumentParser, with_prompt: bool) -> None:
    """Options shared by generate and batch: one flag per request setting (dc_app.settings.FIELDS; unset flags
    keep the model's defaults), then the model and the server's performance options."""
    p.add_argument("--model", default="512", choices=MODEL_NAMES, help="checkpoint to use (default: 512)")
    add_cli_flags(p, skip=() if with_prompt else ("prompt",))  # batch: each item brings its own prompt
    p.add_argument("--compare", action="store_true",
                   help="run upstream's stock sampler beside --sampler (default fixed) on the same seed; the stock "
                        "video goes to <out>.stock.mp4 (interpolation models: with --image2, or a loop)")
    p.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available; cuda:LOCAL_RANK under torchrun)")
    add_performance_options(p)  # the app's --dtype, --vae-dtype, --offload, ... (dc_app.options)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose result has every performance option settled (the --low-vram preset's value or the
    default for each one not given); the subcommands' parsers are of this class too."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if hasattr(parsed, "low_vram"):
            settle_performance_options(parsed)
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dc_app", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one image (or two, with 512_interp) -> one mp4 and its JSON")
    first = gen.add_mutually_exclusive_group(required=True)
    first.add_argument("--image", type=Path, help="input image")
    first.add_argument("--extend", type=Path, metavar="VIDEO",
                       help="image-to-video models: continue this video from its last frame (--frames more frames)")
    first.add_argument("--keyframes", type=Path, nargs="+", metavar="IMAGE",
                       help="interpolation models: a storyboard through 2 or more keyframes, in this order")
    gen.add_argument("--prompts", nargs="+", metavar="PROMPT",
                     help="with --keyframes: one prompt per segment (else --prompt for all)")
    gen.add_argument("--loop", action="store_true", help="with --keyframes: close the storyboard back to the first")
    gen.add_argument("--image2", type=Path,
                     help="interpolation models (512_interp, tooncrafter_512): the last frame (without it, a loop "
                          "back to --image)")
    gen.add_argument("--out", required=True, type=Path, help="output mp4; the JSON goes next to it (.json)")
    _sampling_options(gen, with_prompt=True)

    batch = sub.add_parser("batch", help="a folder of images or a CSV of image,prompt rows -> one mp4 each")
    batch.add_argument("--input", required=True, type=Path,
                       help="folder of images (same-name .txt = prompt) or CSV with image,prompt[,image2] columns")
    batch.add_argument("--out-dir", required=True, type=Path, help="folder for <image name>.mp4 and .json")
    _sampling_options(batch, with_prompt=False)

    estimate = sub.add_parser("estimate", help="will it fit? the peak memory a generation needs, against the device's "
                                               "free memory, without loading the model")
    estimate.add_argument("--model", default="512", choices=MODEL_NAMES, help="checkpoint to estimate (default: 512)")
    add_cli_flags(estimate, skip=tuple(f.name for f in FIELDS if f.name not in ("frames", "perframe_ae")))
    estimate.add_argument("--device", help="cuda, cuda:1 or cpu: whose free memory (default: cuda if available)")
    add_performance_options(estimate)
    return parser


# ------------------------------------------------------------------------------------------------ batch input
@dataclass(frozen=True)
class Item:
    name: str                  # output file stem, unique within the batch
    image: Path
    prompt: str
    image2: Path | None = None


def read_items(source: Path) -> list[Item]:
    """The batch, in a fixed order (every rank must see the same list): folder in name order, CSV in row order."""
    if source.is_dir():
        rows = []
        for image in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            text = image.with_suffix(".txt")
            rows.append((image, text.read_text(encoding="utf-8").strip() if text.is_file() else "", None))
    elif source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise SystemExit(f"{source}: a CSV needs a header with an 'image' column (and 'prompt', 'image2')")
            rows = []
            for row in reader:
                image2 = (row.get("image2") or "").strip()
                rows.append((source.parent / row["image"].strip(), (row.get("prompt") or "").strip(),
                             source.parent / image2 if image2 else None))
    else:
        raise SystemExit(f"--input {source}: expected a folder of images or a .csv file")
    items, used = [], set()
    for image, prompt, image2 in rows:
        name, n = image.stem, 1
        while name in used:  # a.png and a.jpg, or one image with several prompts
            n += 1
            name = f"{image.stem}-{n}"
        used.add(name)
        items.append(Item(name, image, prompt, image2))
    return items


def shard(items: Sequence[Item], env=os.environ) -> list[Item]:
    """This process's share under torchrun: items RANK, RANK + WORLD_SIZE, ... (all of them without torchrun)."""
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise SystemExit(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return list(items[rank::world])


# ------------------------------------------------------------------------------------------------ running
def torchrun_device(env=os.environ) -> str | None:
    """cuda:LOCAL_RANK under torchrun with GPUs, else None (load_for_serving picks cuda or cpu)."""
    if "LOCAL_RANK" in env:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(env['LOCAL_RANK'])}"
    return None


class StepBar:
    """The service's progress(step, total, label) calls as a tqdm bar, a new bar per sampler run."""

    def __init__(self, prefix: str = ""):
        self.prefix, self.bar, self.label = prefix, None, None

    def __call__(self, step: int, total: int, label: str) -> None:
        from tqdm import tqdm

        if self.bar is None or label != self.label or total != self.bar.total:
            self.close()
            self.bar = tqdm(total=total, desc=f"{self.prefix}{label}", unit="step", leave=False)
            self.label = label
        self.bar.update(step - self.bar.n)
        if step == total:
            # tqdm redraws at most every 0.1 s; steps faster than that would leave the bar short of its end.
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _move_result(video: str, dest: Path) -> Path:
    """Move a result mp4 and its JSON sidecar from the service's folder to `dest` (.mp4) and `dest`.json."""
    from .service import Service

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(video, dest)
    shutil.move(Service.sidecar_of(video), dest.with_suffix(".json"))
    return dest


def run_one(service, item: Item, out: Path, args, progress) -> tuple[list[Path], str]:
    """One item through the service -> (written mp4 paths, report). Raises the service's UserFacingError."""
    values = {**cli_values(args), "prompt": item.prompt}
    if getattr(args, "extend", None):
        result = service.extend(str(args.extend), progress=progress, **values)
        return [_move_result(result.video, out)], result.report()
    if getattr(args, "keyframes", None):
        result = service.storyboard([str(k) for k in args.keyframes], args.prompts, args.loop, progress=progress,
                                    **values)
        return [_move_result(result.video, out)], result.report()
    images = [str(item.image)] + ([str(item.image2)] if item.image2 else [])
    if service.is_interp_model and not args.compare:
        result = service.interpolate(*images, progress=progress, **values)
        return [_move_result(result.video, out)], result.report()
    if item.image2 is not None and not service.is_interp_model:
        raise SystemExit(f"--image2 needs --model 512_interp or another interpolation model (the "
                         f"{service.model_name} model takes one image)")
    if args.compare:
        # Stock beside the chosen sampler; on interpolation models, between the two images (or a loop).
        result = service.compare(*images, progress=progress, **values)
        written = [_move_result(result.video, out)]
        if result.stock.video is not None:
            written.append(_move_result(result.stock.video, out.with_suffix(".stock.mp4")))
        return written, result.report()
    result = service.generate(str(item.image), progress=progress, **values)
    return [_move_result(result.video, out)], result.report()


def open_service(args, work_dir: Path):
    """Load the model and wrap it in the Service the UI uses; results land in `work_dir` first."""
    from .loading import load_for_serving
    from .service import Service

    from .loading.checkpoints import CheckpointError
    from .models.weight_storage import WeightStorageUnsupported

    try:
        model = load_for_serving(args.model, device=args.device or torchrun_device(), **model_options(args))
    except (CheckpointError, WeightStorageUnsupported) as err:
        # Written for the person: no weights where they were looked for, or an option this device cannot do.
        raise SystemExit(f"could not load the {args.model} model: {err}") from None
    return Service(model, output_dir=work_dir, **service_options(args))


def run_estimate(args: argparse.Namespace) -> int:
    """`python -m dc_app estimate`: the breakdown, the device's free memory and the verdict; exit status 1 when
    even the estimate's low end does not fit (so a script can check before it starts a long download)."""
    import torch

    from .loading import default_device
    from .loading.spec import load_model_config, model_spec
    from .memory_estimate import GiB, free_memory
    from .memory_fit import DOES_NOT_FIT, MemorySetup, check_fit
    from .options import describe
    from .service import decode_chunk, serving_defaults

    spec = model_spec(load_model_config(args.model))
    frames = spec.frames if args.frames is None else args.frames
    lo, hi = spec.defaults.frames_range
    if not lo <= frames <= hi:
        raise SystemExit(f"--frames {frames}: the {args.model} model makes {lo} to {hi} frames")
    # The request's decode chunk as the service picks it.
    perframe = args.perframe_ae
    if perframe is None:
        perframe = serving_defaults(spec.defaults, args.decode_chunk_size).perframe_ae
    device = args.device or str(default_device())
    setup = MemorySetup(model=args.model, frames=frames, dtype=args.dtype or "fp32", vae_dtype=args.vae_dtype,
                        weights_dtype=args.weights_dtype, ff_chunking=args.ff_chunk_size, cfg_mode=args.cfg_mode,
                        decode_chunk_size=decode_chunk(perframe, args.decode_chunk_size, spec.frames),
                        offload=args.offload, device_type="cuda" if device.startswith("cuda") else "cpu")
    print(f"{args.model} model, {frames} frames, on {device}: {describe(args)}")
    estimate = setup.estimate()
    for phase in estimate.phases:
        low, high = phase.total
        print(f"  {phase.name:8s} weights {phase.weights / GiB:6.2f} GiB + activations "
              f"{phase.activations[0] / GiB:.2f}-{phase.activations[1] / GiB:.2f} GiB = "
              f"{low / GiB:.2f}-{high / GiB:.2f} GiB")
    if setup.device_type == "cuda" and not torch.cuda.is_available():
        # Estimating for a GPU from a machine without one is fine; there is just no free memory to compare.
        print(f"This {estimate.describe()}. No CUDA device here to compare it with.")
        return 0
    fit = check_fit(setup, free_memory(device), held=0)
    print(fit.line())
    if fit.advice:
        print(fit.advice)
    return 1 if fit.verdict == DOES_NOT_FIT else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "estimate":
        return run_estimate(args)
    from .validation import UserFacingError

    if args.command == "generate":
        if args.out.suffix.lower() != ".mp4":
            raise SystemExit(f"--out {args.out}: expected a file name ending in .mp4")
        image = args.image or (args.keyframes or [args.extend])[0]  # storyboard/extend: the inputs come from args
        items, out_dir = [Item(args.out.stem, image, args.prompt or "", args.image2)], args.out.parent
        targets = {args.out.stem: args.out}
    else:
        items, out_dir = shard(read_items(args.input)), args.out_dir
        targets = {item.name: args.out_dir / f"{item.name}.mp4" for item in items}
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    world = int(os.environ.get("WORLD_SIZE", 1))
    prefix = f"[rank {os.environ.get('RANK', 0)}] " if world > 1 else ""
    failures = 0
    # The service writes into a private folder beside the outputs (same file system: moves are renames).
    with tempfile.TemporaryDirectory(prefix=".dc_app-", dir=out_dir) as work:
        service = open_service(args, Path(work))
        bar = StepBar(prefix)
        for item in tqdm(items, desc=f"{prefix}batch", unit="video", disable=args.command == "generate"):
            try:
                written, report = run_one(service, item, targets[item.name], args, bar)
            except UserFacingError as err:
                failures += 1
                print(f"{prefix}{item.image}: {err}", file=sys.stderr)
                continue
            finally:
                bar.close()
            print("\n".join([f"{prefix}{p}" for p in written] + [report]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
