"""The performance options of the app and the CLI: one list of names, allowed values and environment forms.

app.py and `python -m dc_app` both add these options with `add_performance_options`, settle them with
`settle_performance_options` (an option not given takes the --low-vram preset's value, else its default), and
hand them to `dc_app.loading.load_for_serving` (model set-up) and `dc_app.service.Service` (per-request defaults)
through `model_options` / `service_options`, so the two front-ends cannot drift apart. This module imports no
torch (only --low-vram asks torch what the device supports): `--help` answers at once.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .models.token_chunking import TokenChunking, parse_token_chunking

DTYPE_NAMES = ("fp32", "fp16", "bf16")
OFFLOAD_MODES = ("none", "encoders", "all")
CFG_MODES = ("batched", "two-call")
WEIGHT_STORAGE_NAMES = ("fp8", "int8")  # 8-bit UNet weights (dc_app.models.weight_storage)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def one_of(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return check


def frame_count(value: Any) -> int:
    """A decode chunk: a whole number of frames, 1 or more."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"expected a whole number of frames, 1 or more, got {value!r}")
    return n


def on_off(value: Any) -> bool:
    """A switch given as text (environment variables): 1/true/yes/on or 0/false/no/off."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE[:-1])}, got {value!r}")


@dataclass(frozen=True)
class Option:
    flag: str
    env: str                       # its environment form, read by app.py only
    parse: Callable[[Any], Any]    # text -> value; raises ValueError whose message lists what is allowed
    default: Any
    help: str
    metavar: str | None = None
    switch: bool = False           # a flag without a value (--compile)

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


PERFORMANCE_OPTIONS = (
    Option("--dtype", "DC_APP_DTYPE", one_of(DTYPE_NAMES), None,
           "precision of the UNet, CLIP and Resampler (default: fp32; bf16 needs Ampere or newer on GPU)",
           metavar="{" + ",".join(DTYPE_NAMES) + "}"),
    Option("--vae-dtype", "DC_APP_VAE_DTYPE", one_of(DTYPE_NAMES), "fp32",
           "precision of the VAE (default: fp32; fp16 VAE decode is a known cause of black videos)",
           metavar="{" + ",".join(DTYPE_NAMES) + "}"),
    Option("--offload", "DC_APP_OFFLOAD", one_of(OFFLOAD_MODES), "none",
           "keep parts in CPU RAM, on the GPU only while they run: encoders (text and image encoders) or all "
           "(the VAE too); saves GPU memory, costs a copy per request (default: none)",
           metavar="{" + ",".join(OFFLOAD_MODES) + "}"),
    Option("--decode-chunk-size", "DC_APP_DECODE_CHUNK_SIZE", frame_count, None,
           "frames the VAE decodes at once (default: 1 where the model decodes per frame, else all); a request's "
           "per-frame decode setting still picks 1", metavar="N"),
    Option("--cfg-mode", "DC_APP_CFG_MODE", one_of(CFG_MODES), "batched",
           "classifier-free guidance as one batched UNet call (default, faster) or two calls (less GPU memory)",
           metavar="{" + ",".join(CFG_MODES) + "}"),
    Option("--compile", "DC_APP_COMPILE", on_off, False,
           "torch.compile the UNet (off by default: the first request then compiles for minutes)", switch=True),
    Option("--ff-chunk-size", "DC_APP_FF_CHUNK_SIZE", parse_token_chunking, None,
           "run the UNet's transformer blocks and feed-forwards over at most N tokens at once, or within a memory "
           "budget such as 64MiB; same result, a much lower peak (default: all tokens at once)", metavar="N|SIZE"),
    Option("--weights-dtype", "DC_APP_WEIGHTS_DTYPE", one_of(WEIGHT_STORAGE_NAMES), None,
           "store the UNet's Linear and conv weights in 8 bits (int8 or fp8, a scale per output channel), "
           "upcast layer by layer to --dtype when used: about half the UNet's memory of fp16 (default: as --dtype)",
           metavar="{" + ",".join(WEIGHT_STORAGE_NAMES) + "}"),
    Option("--low-vram", "DC_APP_LOW_VRAM", on_off, False,
           "the low-memory preset for 8-12 GB GPUs: --dtype bf16 (fp16 where the GPU lacks bf16), --offload all, "
           "--decode-chunk-size 1 (a temporal decoder keeps its own), --ff-chunk-size 4096, --weights-dtype int8, "
           "--cfg-mode two-call; an option given explicitly overrides its value", switch=True),
)

# --low-vram's values. dtype "half" is settled per device (bf16 where supported, else fp16); decode_chunk_size
# is left out for a temporal decoder (ToonCrafter), which decodes its own chunk of frames whatever is asked.
LOW_VRAM_FF_TOKENS = 4096
LOW_VRAM_PRESET = dict(dtype="half", offload="all", decode_chunk_size=1,
                       ff_chunk_size=TokenChunking(tokens=LOW_VRAM_FF_TOKENS), weights_dtype="int8",
                       cfg_mode="two-call")


def add_performance_options(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Add the options to `parser`.

    Without `env` (the CLI) argparse checks each value as it parses. With `env` (the app) the DC_APP_* variables
    give the defaults; argparse never checks a default, so the app calls `check_performance_options` after
    parsing, which checks the command line and the environment alike and names both forms.
    """
    for o in PERFORMANCE_OPTIONS:
        # None marks "not given": settle_performance_options then picks the preset's value or the default.
        default = None if env is None else (env.get(o.env) or None)
        shown = f" (environment: {o.env})" if env is not None else ""
        if o.switch:
            # --no-compile too: it overrides DC_APP_COMPILE=1 for one start.
            parser.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=default, help=o.help + shown)
        else:
            parser.add_argument(o.flag, default=default, metavar=o.metavar, help=o.help + shown,
                                type=_argparse_type(o) if env is None else None)


def check_performance_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn the app's raw values (text from the command line or the environment) into checked ones, in place;
    a bad one stops the start with a message naming the option, its variable and the allowed values."""
    for o in PERFORMANCE_OPTIONS:
        value = getattr(args, o.dest)
        if value is None:
            continue
        try:
            setattr(args, o.dest, o.parse(value))
        except ValueError as err:
            parser.error(f"{o.flag}/{o.env}: {err}")


def settle_performance_options(args: argparse.Namespace) -> argparse.Namespace:
    """Give every option that was not given (None) the --low-vram preset's value when the preset is on, else its
    default, in place. `args.preset_options` lists the options the preset set, for the log and the report.
    Settling twice changes nothing (argparse's subcommands hand their settled result to the main parser)."""
    if hasattr(args, "preset_options"):
        return args
    preset = low_vram_preset(getattr(args, "model", None), getattr(args, "device", None)) \
        if getattr(args, "low_vram", None) else {}
    from_preset = []
    for o in PERFORMANCE_OPTIONS:
        if getattr(args, o.dest) is not None:
            continue
        if o.dest in preset:
            setattr(args, o.dest, preset[o.dest])
            from_preset.append(o.dest)
        else:
            setattr(args, o.dest, o.default)
    args.preset_options = tuple(from_preset)
    return args


def low_vram_preset(model: str | None, device: str | None) -> dict:
    """LOW_VRAM_PRESET settled for a model and a device (None: the default device)."""
    values = dict(LOW_VRAM_PRESET, dtype=half_precision(device))
    if model is not None and _temporal_decoder(model):
        del values["decode_chunk_size"]
    return values


def half_precision(device: str | None) -> str:
    """bf16 where the device computes in it (any CPU; Ampere and newer GPUs), else fp16."""
    import torch

    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"  # a CPU; or a GPU this machine does not have (`estimate` for another machine): the usual case


def _temporal_decoder(model: str) -> bool:
    from .loading.spec import load_model_config, model_spec

    try:
        return model_spec(load_model_config(model)).temporal_decoder
    except (FileNotFoundError, ValueError):
        return False  # an unknown model is refused later, with its own message


def _argparse_type(o: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return o.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def model_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `dc_app.loading.load_for_serving` from parsed options."""
    return dict(dtype=args.dtype, vae_dtype=args.vae_dtype, offload=args.offload, compile=args.compile,
                weights_dtype=args.weights_dtype, ff_chunk_size=args.ff_chunk_size)


def service_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `dc_app.service.Service`: the server's defaults for every request."""
    return dict(decode_chunk_size=args.decode_chunk_size, cfg_mode=args.cfg_mode)


def describe(args: argparse.Namespace) -> str:
    """The set-up in a few words, for the start-up log."""
    words = [args.dtype or "fp32", f"VAE {args.vae_dtype}", f"CFG {args.cfg_mode}"]
    if getattr(args, "low_vram", False):
        words.insert(0, "low-vram preset")
    if args.weights_dtype is not None:
        words.append(f"UNet weights {args.weights_dtype}")
    if args.ff_chunk_size is not None:
        words.append(f"transformer chunks: {args.ff_chunk_size}")
    if args.offload != "none":
        words.append(f"offload {args.offload}")
    if args.decode_chunk_size is not None:
        words.append(f"decode {args.decode_chunk_size} frame{'s' if args.decode_chunk_size != 1 else ''} at a time")
    if args.compile:
        words.append("compiled UNet")
    return ", ".join(words)
