"""Will this run fit? The memory estimate of a request against what the device has, and what would make it fit.

`dc_app.memory_estimate` predicts a generation's peak from the config and the options, as a range. Here that
range meets the device: on a GPU its free memory (torch.cuda.mem_get_info), on a CPU the available RAM. A
serving process already holds its weights, so the memory a run can count on is what is free now plus what the
model holds (the estimate's total includes the weights). Then:

* the low end above that: the run cannot fit; it is refused before it starts, naming the setting or the start
  option that would make it fit (checked by estimating with it);
* only the high end above it: it may not fit; it runs, with a warning in the report;
* otherwise it fits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from omegaconf import DictConfig

from .loading.spec import load_model_config, model_spec
from .memory_estimate import MemoryEstimate, estimate_memory, size, size_span, tensor_bytes
from .models.token_chunking import TokenChunking
from .options import PERFORMANCE_OPTIONS, low_vram_preset

FITS, MAY_NOT_FIT, DOES_NOT_FIT = "fits", "may not fit", "does not fit"


@dataclass(frozen=True)
class MemorySetup:
    """What the estimate needs to know of a run: the server's options (as the options spell them) and the
    request's frames and decode chunk."""

    model: DictConfig | str    # the config, or a model name
    frames: int
    dtype: str = "fp32"
    vae_dtype: str = "fp32"
    weights_dtype: str | None = None
    ff_chunking: TokenChunking | None = None
    cfg_mode: str = "batched"
    decode_chunk_size: int | None = None
    offload: str = "none"
    device_type: str = "cuda"

    def estimate(self) -> MemoryEstimate:
        chunk = self.ff_chunking
        return estimate_memory(self.model, frames=self.frames, dtype=self.dtype, vae_dtype=self.vae_dtype,
                               weights_dtype=self.weights_dtype, cfg_mode=self.cfg_mode,
                               ff_chunk_size=None if chunk is None else chunk.tokens,
                               ff_chunk_budget=None if chunk is None else chunk.budget_bytes,
                               decode_chunk_size=self.decode_chunk_size, offload=self.offload,
                               device_type=self.device_type)


@dataclass(frozen=True)
class MemoryFit:
    estimate: MemoryEstimate
    available: int          # bytes this run can count on: free now + what the model already holds
    free: int               # free now (GPU memory, or available RAM on a CPU)
    device_type: str
    verdict: str            # FITS | MAY_NOT_FIT | DOES_NOT_FIT
    frames: int             # the request's frame count, which the estimate is for
    advice: str = ""        # what would make it fit, in words (empty when it fits)

    @property
    def memory(self) -> str:
        return "GPU memory" if self.device_type == "cuda" else "RAM"

    def line(self) -> str:
        """The UI's line next to Generate, and the report's."""
        low, high = self.estimate.total
        where = "this GPU" if self.device_type == "cuda" else "this machine"
        held = self.available - self.free
        has = (f"{size(self.available)} for it ({size(self.free)} free + {size(held)} the model holds)"
               if held else f"{size(self.free)} free")
        return f"Memory for {self.frames} frames: needs about {size_span(low, high)}; {where} has {has}: {self.verdict}."

    def warning(self) -> str | None:
        """MAY_NOT_FIT: the report's notice."""
        if self.verdict != MAY_NOT_FIT:
            return None
        low, high = self.estimate.total
        return (f"memory: this run needs {size_span(low, high)} of {self.memory} and {size(self.available)} is "
                f"available: it may run out; {self.advice or 'start with --low-vram if it does'}")

    def refusal(self) -> str:
        """DOES_NOT_FIT: the message that refuses the run."""
        low, _ = self.estimate.total
        return (f"not enough {self.memory}: this run needs at least {size(low)} and {size(self.available)} is "
                f"available ({self.estimate.describe()}). {self.advice}")


def check_fit(setup: MemorySetup, free: int, held: int) -> MemoryFit:
    """The verdict for `setup` with `free` bytes free and `held` bytes already held by the loaded model."""
    estimate = setup.estimate()
    available = free + held
    low, high = estimate.total
    verdict = DOES_NOT_FIT if low > available else MAY_NOT_FIT if high > available else FITS
    # Refused: what makes the low end fit (it then runs); at risk: what makes the high end fit.
    advice = "" if verdict == FITS else _advice(setup, available, end=0 if verdict == DOES_NOT_FIT else 1)
    return MemoryFit(estimate, available, free, setup.device_type, verdict, setup.frames, advice)


def held_bytes(model) -> int:
    """Bytes of the model's parameters and buffers on its device (offloaded parts are in CPU RAM: on a GPU they
    do not count; on a CPU everything does)."""
    return tensor_bytes(t for t in [*model.parameters(), *model.buffers()] if t.device == model.device)


# Start options to try, one at a time (in this order: the ones that cost least time first), then together as
# --low-vram; each with --low-vram's own value. Options already in effect are skipped.
_ONE_AT_A_TIME = ("ff_chunk_size", "cfg_mode", "offload", "dtype", "weights_dtype")


def _start_options(setup: MemorySetup) -> list[tuple[str, dict]]:
    """[(the flag as a person types it, what it changes in the setup), ...]."""
    preset = low_vram_preset(None, setup.device_type)
    flags = {o.dest: o.flag for o in PERFORMANCE_OPTIONS}

    def change(dest: str) -> tuple[str, object]:  # an option's value as the setup field it sets
        return ("ff_chunking", preset[dest]) if dest == "ff_chunk_size" else (dest, preset[dest])

    def typed(value) -> str:
        return str(value.tokens) if isinstance(value, TokenChunking) else str(value)

    options = [(f"{flags[dest]} {typed(preset[dest])}", dict([change(dest)])) for dest in _ONE_AT_A_TIME]
    options.append(("--low-vram", dict(change(dest) for dest in preset)))
    return [(flag, values) for flag, values in options if any(getattr(setup, k) != v for k, v in values.items())]


def _advice(setup: MemorySetup, available: int, end: int) -> str:
    """The first change, request settings before start options, under which the estimate's `end` (0: low,
    1: high) fits in `available` bytes."""
    request = []
    if setup.decode_chunk_size not in (None, 1):
        request.append(("turn on VAE per-frame decode (advanced settings)", dict(decode_chunk_size=1)))
    trained = _trained_frames(setup)
    if setup.frames > trained:
        request.append((f"ask for {trained} frames", dict(frames=trained)))
    for words, values in request:
        if replace(setup, **values).estimate().total[end] <= available:
            return f"To fit: {words}."
    start = _start_options(setup)
    for flag, values in start:
        low, high = replace(setup, **values).estimate().total
        if (low, high)[end] <= available:
            return f"To fit: start the app (or the CLI) with {flag} (then about {size_span(low, high)})."
    leanest = replace(setup, **start[-1][1]) if start else setup
    return (f"Even with every low-memory option it needs about {size(leanest.estimate().total[0])}: use a "
            f"smaller model or a device with more memory.")


def _trained_frames(setup: MemorySetup) -> int:
    cfg = setup.model if not isinstance(setup.model, str) else load_model_config(setup.model)
    return model_spec(cfg).frames
