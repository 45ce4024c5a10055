"""What the UI, the API and the CLI call: one method per endpoint, around one loaded model.

Each method validates every field (see dc_app.validation), picks the seed and the sampler(s), runs the
pipeline under the device lock, writes the mp4 and its JSON, and says in plain words what happened. A
request ends with a result or a `UserFacingError` whose message can be shown as it is; whatever happens,
no partial file is left behind and the next request works.
"""
from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TIMESTEP_SPACINGS
from .faults import FaultPlan, InjectedFault
from .images import prepare_image
from .loading import dtype_name, offload_mode
from .model_loader import ModelLoader
from .options import CFG_MODES
from .pipeline import SAMPLERS, run_synthesis
from .schedule import ddim_timesteps
from .stock_failure import StockSamplerFailure
from .storage import OutputStore
from .validation import (
    InputError,
    UserFacingError,
    choice,
    clean_prompt,
    flag,
    real_number,
    seed_value,
    whole_number,
)
from .video import write_mp4, write_sidecar

log = logging.getLogger("dc_app.service")

STEPS_RANGE = (1, 1000)
ETA_RANGE = (0.0, 1.0)
CFG_RANGE = (1.0, 15.0)
RESCALE_RANGE = (0.0, 1.0)

# Rough seconds per DDIM step (two UNet passes) on one H100, for ZeroGPU's duration estimate.
_SECONDS_PER_STEP = {"256": 0.2, "512": 0.5, "512_interp": 0.5, "1024": 1.5, "tiny": 0.05}
_OVERHEAD_S = 20  # encoders, VAE decode, mp4


class Cancelled(UserFacingError):
    """The person stopped the run; the message says at which step."""


class OutOfMemory(UserFacingError):
    """The device (or the host) ran out of memory; the message suggests what to change."""


class RunFailed(UserFacingError):
    """The run could not produce a video (a stock-sampler crash, or an internal error)."""


@dataclass(frozen=True)
class Request:
    """A validated request: every field in range, defaults filled in from the model."""

    prompt: str
    steps: int
    eta: float
    cfg_scale: float
    fs: int
    seed: int
    guidance_rescale: float
    timestep_spacing: str
    perframe_ae: bool
    decode_chunk_size: int   # frames the VAE decodes at once: 1 with per-frame decode, else the server's chunk
    cfg_mode: str            # "batched" or "two-call" (dc_app.options.CFG_MODES)
    notices: tuple[str, ...]


@dataclass
class RunOutcome:
    """One sampler's run: its files (None when it crashed) and its plain-words report line."""

    sampler: str
    video: Path | None
    sidecar: Path | None
    line: str
    seconds: float
    timesteps: tuple[int, ...] = ()  # the DDPM timesteps the sampler ran (empty after a crash)


def _fmt_num(x: float) -> str:
    return f"{x:g}"


class PeakMemory:
    """Peak memory torch allocated on a CUDA device during a `with` block; `bytes` stays None elsewhere.

    A CPU run has no VRAM figure, and none is made up for it. The counter is the device's, not the block's:
    one generation per device at a time (the service's lock) is what makes it this run's peak.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        return False


def run_note(seconds: float, peak_bytes: int | None) -> str:
    """'(12.3 s)', or '(12.3 s, peak VRAM 9.87 GiB)' when the run was measured on a GPU."""
    if peak_bytes is None:
        return f"({seconds:.1f} s)"
    return f"({seconds:.1f} s, peak VRAM {peak_bytes / 2**30:.2f} GiB)"


class Service:
    """Generation jobs on one loaded model; one job at a time per instance (one instance per device)."""

    def __init__(self, model, output_dir: Path | str | None = None, fault: FaultPlan | None = None,
                 store: OutputStore | None = None, fps: int | None = None, decode_chunk_size: int | None = None,
                 cfg_mode: str = "batched"):
        """`model`: a loaded model, or a dc_app.model_loader.ModelLoader still loading one (the service's facts
        come from its config; requests get a plain "still loading" message until it is ready).

        `decode_chunk_size` and `cfg_mode` are the server's settings for every request (app and CLI options
        --decode-chunk-size and --cfg-mode); None keeps the model's per-frame or all-frames decode."""
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode {cfg_mode!r}: expected one of {', '.join(CFG_MODES)}")
        if decode_chunk_size is not None and (isinstance(decode_chunk_size, bool) or int(decode_chunk_size) < 1
                                              or int(decode_chunk_size) != decode_chunk_size):
            raise ValueError(f"decode_chunk_size {decode_chunk_size!r}: expected a whole number of frames, 1 or more")
        self._source = model
        self.defaults = model.defaults
        self.decode_chunk_size = None if decode_chunk_size is None else int(decode_chunk_size)
        self.cfg_mode = cfg_mode
        if self.decode_chunk_size is not None:
            # A chunk chosen for the server replaces the model's per-frame default in every request (and in the
            # UI's and API's defaults, which read these); a request can still ask for per-frame decode.
            self.defaults = replace(self.defaults, perframe_ae=self.decode_chunk_size == 1)
        self.model_name = str(model.config.get("name", "custom"))
        self.store = store or OutputStore(output_dir)
        self.store.sweep()  # results left by an earlier process age out like any other
        self.fault = fault
        self.fps = int(fps or self.defaults.video_fps)
        self._lock = threading.Lock()
        self._stage = "starting"  # what the running job is doing, for error messages (one job at a time)
        h, w = model.image_size
        self.frame_size = (8 * h, 8 * w)  # pixels: the VAE downsamples by 8
        self.frames = int(model.temporal_length)

    # ------------------------------------------------------------------------------------------ facts
    @property
    def model(self):
        """The loaded model; while a ModelLoader is still loading (or failed), a ModelNotReady saying so."""
        return self._source.model if isinstance(self._source, ModelLoader) else self._source

    @property
    def model_status(self) -> tuple[str, str]:
        """(state: 'ready', 'loading' or 'failed'; what the model is doing in plain words, or the load error)."""
        if isinstance(self._source, ModelLoader):
            return self._source.state, self._source.status
        return "ready", "ready"

    @property
    def is_test_model(self) -> bool:
        return self.model_name == "tiny"

    @property
    def is_interp_model(self) -> bool:
        return bool(self.defaults.interp)

    def gpu_seconds(self, steps: Any = None, runs: int = 1) -> int:
        """ZeroGPU duration estimate for a request (bad input gets the default; validation rejects it later)."""
        try:
            n = whole_number("steps", steps, *STEPS_RANGE)
        except InputError:
            n = self.defaults.ddim_steps
        per_step = _SECONDS_PER_STEP.get(self.model_name, 1.5)
        return int(min(600, _OVERHEAD_S + runs * n * per_step))

    # ----------------------------------------------------------------------------------- validation
    def validate(self, prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing,
                 perframe_ae) -> Request:
        """Every field checked, None replaced by the model's default; raises InputError naming the field."""
        d = self.defaults
        text_encoder = getattr(self.model, "cond_stage_model", None)
        num_tokens = getattr(text_encoder, "num_tokens", None)
        context_length = int(getattr(text_encoder, "context_length", 77))
        prompt, notices = clean_prompt(prompt, num_tokens, context_length)
        fs_lo, fs_hi = d.fs_range

        def given(value, default):
            return default if value is None else value

        perframe_ae = flag("perframe_ae", given(perframe_ae, d.perframe_ae))
        batched_chunk = min(self.decode_chunk_size or self.frames, self.frames)
        return Request(
            prompt=prompt,
            steps=whole_number("steps", given(steps, d.ddim_steps), *STEPS_RANGE),
            eta=real_number("eta", given(eta, d.ddim_eta), *ETA_RANGE),
            cfg_scale=real_number("cfg_scale", given(cfg_scale, d.cfg_scale), *CFG_RANGE),
            fs=whole_number("fs", given(fs, d.fs), fs_lo, fs_hi),
            seed=seed_value(given(seed, -1)),
            guidance_rescale=real_number("guidance_rescale", given(guidance_rescale, d.guidance_rescale),
                                         *RESCALE_RANGE),
            timestep_spacing=choice("timestep_spacing", given(timestep_spacing, d.timestep_spacing),
                                    TIMESTEP_SPACINGS),
            perframe_ae=perframe_ae,
            decode_chunk_size=1 if perframe_ae else batched_chunk,
            cfg_mode=self.cfg_mode,
            notices=tuple(notices),
        )

    # ------------------------------------------------------------------------------------- endpoints
    def generate(self, image, prompt: str = "", steps: int | None = None, eta: float | None = None,
                 cfg_scale: float | None = None, fs: int | None = None, seed: int = -1,
                 guidance_rescale: float | None = None, timestep_spacing: str | None = None,
                 sampler: str = "fixed", perframe_ae: bool | None = None, *,
                 progress: Callable[[int, int, str], None] | None = None,
                 cancel: threading.Event | None = None) -> tuple[str, str, int]:
        """One video -> (mp4 path, report, seed used). None for a setting means the model's default."""
        sampler = choice("sampler", "fixed" if sampler is None else sampler, SAMPLERS)
        req = self.validate(prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing,
                            perframe_ae)
        videos = self._i2v_input(image)
        outcomes, seed_used = self._run_job(req, videos, [sampler], progress, cancel, interp=False, loop=False)
        out = outcomes[0]
        report = self._report(req, seed_used, outcomes)
        if out.video is None:
            raise RunFailed(report)
        return str(out.video), report, seed_used

    def compare(self, image, prompt: str = "", steps: int | None = None, eta: float | None = None,
                cfg_scale: float | None = None, fs: int | None = None, seed: int = -1,
                guidance_rescale: float | None = None, timestep_spacing: str | None = None,
                perframe_ae: bool | None = None, *,
                progress: Callable[[int, int, str], None] | None = None,
                cancel: threading.Event | None = None) -> tuple[str | None, str, str]:
        """Stock and fixed on the same seed and noise -> (stock mp4 or None after a crash, fixed mp4, report)."""
        req = self.validate(prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing,
                            perframe_ae)
        videos = self._i2v_input(image)
        outcomes, seed_used = self._run_job(req, videos, ["stock", "fixed"], progress, cancel,
                                            interp=False, loop=False)
        stock, fixed = outcomes
        report = self._report(req, seed_used, outcomes)
        if fixed.video is None:
            raise RunFailed(report)
        return (str(stock.video) if stock.video else None), str(fixed.video), report

    def interpolate(self, image, image2=None, prompt: str = "", steps: int | None = None,
                    eta: float | None = None, cfg_scale: float | None = None, fs: int | None = None,
                    seed: int = -1, guidance_rescale: float | None = None, timestep_spacing: str | None = None,
                    sampler: str = "fixed", perframe_ae: bool | None = None, *,
                    progress: Callable[[int, int, str], None] | None = None,
                    cancel: threading.Event | None = None) -> tuple[str, str, int]:
        """512_interp: a video from `image` to `image2`; without `image2`, a loop back to `image`."""
        if not self.is_interp_model:
            raise InputError(
                f"interpolate: the {self.model_name} model cannot interpolate; start the app with --model 512_interp"
            )
        sampler = choice("sampler", "fixed" if sampler is None else sampler, SAMPLERS)
        req = self.validate(prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing,
                            perframe_ae)
        first = prepare_image(image, *self.frame_size, field="image")
        loop = image2 is None
        last = first if loop else prepare_image(image2, *self.frame_size, field="image2")
        half = (self.frames + 1) // 2
        frames = [first] * half + [last] * (self.frames - half)
        videos = torch.stack(frames, dim=1).unsqueeze(0)  # 1 3 t H W
        outcomes, seed_used = self._run_job(req, videos, [sampler], progress, cancel, interp=True, loop=loop)
        report = self._report(req, seed_used, outcomes)
        if outcomes[0].video is None:
            raise RunFailed(report)
        return str(outcomes[0].video), report, seed_used

    @staticmethod
    def sidecar_of(video_path: str | Path | None) -> str | None:
        """The JSON of settings written next to a result video."""
        return None if not video_path else str(Path(video_path).with_suffix(".json"))

    # --------------------------------------------------------------------------------------- running
    def _i2v_input(self, image) -> torch.Tensor:
        pixels = prepare_image(image, *self.frame_size, field="image")
        # As upstream's loader: the image repeated over every frame (the pipeline conditions on frame 0).
        return pixels.unsqueeze(1).repeat(1, self.frames, 1, 1).unsqueeze(0)  # 1 3 t H W

    def _acquire(self, cancel: threading.Event | None) -> None:
        # Wait for the device, but give up as soon as the person cancels while waiting.
        while not self._lock.acquire(timeout=0.1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before it started")

    def _run_job(self, req: Request, videos: torch.Tensor, samplers: list[str], progress, cancel,
                 interp: bool, loop: bool) -> tuple[list[RunOutcome], int]:
        seed = req.seed if req.seed != -1 else secrets.randbelow(2**32)
        self._acquire(cancel)
        written: list[Path] = []
        failure: UserFacingError | None = None
        try:
            self._stage = "starting"
            self.store.sweep()
            outcomes = []
            for k, name in enumerate(samplers):
                label = f"{name} sampler" + (f" ({k + 1} of {len(samplers)})" if len(samplers) > 1 else "")
                outcomes.append(self._run_one(req, videos, name, seed, progress, cancel, label, interp, loop,
                                              written))
            return outcomes, seed
        except Exception as err:
            # A request that fails leaves nothing: not half a compare, not a sidecar without its video.
            for p in written:
                p.unlink(missing_ok=True)
            if isinstance(err, UserFacingError):
                failure = err
            else:
                # A bug or a broken environment: log it in full, tell the person in plain words without
                # internals (paths, tracebacks), and keep serving.
                log.exception("internal error while %s", self._stage)
                failure = RunFailed(
                    f"internal error while {self._stage} ({type(err).__name__}); nothing was saved. "
                    f"The app is still running: please try again."
                )
            # The traceback's frames hold the run's tensors: drop them so the memory is freed now, not when
            # the caller lets go of the error.
            failure.__traceback__ = None
            failure.__context__ = failure.__cause__ = None
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        finally:
            self._lock.release()
        self._free_memory()
        raise failure

    def _run_one(self, req: Request, videos: torch.Tensor, sampler: str, seed: int, progress, cancel,
                 label: str, interp: bool, loop: bool, written: list[Path]) -> RunOutcome:
        model = self.model
        h, w = model.image_size
        noise_shape = [1, model.channels, self.frames, h, w]
        # A fresh generator per run: stock and fixed draw the same posterior noise, x_T and step noise.
        generator = torch.Generator(device=model.device).manual_seed(seed)
        started = time.perf_counter()
        step_now = [0]

        def on_step(i, n_steps, x_prev=None, pred_x0=None):
            step_now[0] = i + 1
            if progress is not None:
                progress(i + 1, n_steps, label)
            if self.fault is not None:
                self.fault.at_step(i + 1)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {i + 1} of {n_steps}")

        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        self._stage = f"sampling with the {sampler} sampler"
        peak = PeakMemory(model.device)
        try:
            with peak:
                result = run_synthesis(
                    model, sampler, [req.prompt], videos, noise_shape, n_samples=1, ddim_steps=req.steps,
                    ddim_eta=req.eta, unconditional_guidance_scale=req.cfg_scale, fs=req.fs,
                    timestep_spacing=req.timestep_spacing, guidance_rescale=req.guidance_rescale,
                    interp=interp, loop=loop, generator=generator, callback=on_step,
                    decode_chunk_size=req.decode_chunk_size, batched_cfg=req.cfg_mode == "batched",
                )
        except (torch.OutOfMemoryError, MemoryError):
            raise OutOfMemory(
                f"out of memory on {model.device.type} at step {step_now[0]} of the {self.model_name} model: "
                f"try VAE per-frame decode, fewer steps, half precision (--dtype fp16), --offload encoders, "
                f"--cfg-mode two-call or a smaller model (512 or 256)"
            ) from None
        except Cancelled:
            log.info("%s: cancelled at step %d", label, step_now[0])
            raise
        except InjectedFault:
            raise  # a test's fault stands for an unexpected error, never for a stock crash
        except StockSamplerFailure as err:
            if sampler != "stock":
                raise
            # Upstream's sampler fails on some settings; that is what the compare view exists to show.
            seconds = time.perf_counter() - started
            return RunOutcome(sampler, None, None, f"stock: crashed: {err} {run_note(seconds, peak.bytes)}", seconds)

        video = result.videos[0, 0]  # 3 t H W
        mp4, sidecar = self.store.new_paths(sampler)
        frame_hook = None if self.fault is None else (lambda i: self.fault.at_frame(i + 1))
        written.append(mp4)
        self._stage = "writing the video"
        write_mp4(video, mp4, fps=self.fps, on_frame=frame_hook)
        seconds = time.perf_counter() - started
        line = f"{sampler}: {self._health(result, video)} {run_note(seconds, peak.bytes)}"
        written.append(sidecar)
        write_sidecar(sidecar, self._settings(req, seed, sampler, result, line, seconds, interp, loop, peak.bytes))
        return RunOutcome(sampler, mp4, sidecar, line, seconds, tuple(result.ddim_timesteps))

    def _free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    # --------------------------------------------------------------------------------------- reports
    @staticmethod
    def _health(result, video: torch.Tensor) -> str:
        """'finite', or where NaN appeared and how much of the video it blacked out."""
        bad = ~torch.isfinite(video)
        n_steps = len(result.ddim_timesteps)
        if result.nonfinite is None and not bool(bad.any()):
            return "finite"
        where = ""
        if result.nonfinite is not None:
            nf = result.nonfinite
            where = f" from step {int(nf['step']) + 1} of {n_steps} (t={int(nf['timestep'])})"
        share = float(bad.float().mean())
        if share == 1.0:
            effect = "video is black"
        elif share > 0:
            effect = f"{100 * share:.0f}% of the video is black"
        else:
            effect = "the final video is finite all the same"
        return f"NaN{where}: {effect}"

    def _report(self, req: Request, seed: int, outcomes: list[RunOutcome]) -> str:
        lines = [o.line for o in outcomes]
        lines.extend(self._schedule_notes(req, outcomes))
        lines.append(
            f"settings: {req.steps} steps ({req.timestep_spacing}), eta {_fmt_num(req.eta)}, "
            f"CFG {_fmt_num(req.cfg_scale)}, fs {req.fs}, guidance rescale {_fmt_num(req.guidance_rescale)}, "
            f"seed {seed}, model {self.model_name}"
        )
        lines.extend(req.notices)
        return "\n".join(lines)

    def _schedule_notes(self, req: Request, outcomes: list[RunOutcome]) -> list[str]:
        """What the spacing did to the step count, and what the fixed sampler repaired, in words."""
        notes = []
        upstream = [int(t) for t in ddim_timesteps(req.timestep_spacing, req.steps, self.model.num_timesteps)]
        if len(upstream) != req.steps:
            notes.append(f"steps: {req.timestep_spacing} spacing runs {len(upstream)} steps for the {req.steps} "
                          f"asked (upstream's rounding, kept so results match upstream's)")
        invalid = [t for t in upstream if not 0 <= t < self.model.num_timesteps]
        fixed = next((o for o in outcomes if o.sampler == "fixed" and o.timesteps), None)
        if invalid and fixed is not None:
            replaced = sorted(set(fixed.timesteps) - set(upstream))
            notes.append(f"fixed: timestep {', '.join(map(str, invalid))} is outside "
                         f"0..{self.model.num_timesteps - 1}; it ran {', '.join(map(str, replaced))} instead")
        return notes

    def _settings(self, req: Request, seed: int, sampler: str, result, line: str, seconds: float,
                  interp: bool, loop: bool, peak_vram_bytes: int | None = None) -> dict:
        record = {
            "model": self.model_name,
            "sampler": sampler,
            "prompt": req.prompt,
            "seed": seed,
            "steps": req.steps,
            "eta": req.eta,
            "cfg_scale": req.cfg_scale,
            "fs": req.fs,
            "guidance_rescale": req.guidance_rescale,
            "timestep_spacing": req.timestep_spacing,
            "perframe_ae": req.perframe_ae,
            "interp": interp,
            "loop": loop,
            "frames": self.frames,
            "size": list(self.frame_size),
            "fps": self.fps,
            "device": str(self.model.device),
            # Spelled as the options take them (--dtype bf16 ...), so a run can be repeated from its sidecar.
            "dtype": dtype_name(self.model.dtype),
            "vae_dtype": dtype_name(self.model.vae_dtype),
            "offload": offload_mode(self.model),
            "decode_chunk_size": req.decode_chunk_size,
            "cfg_mode": req.cfg_mode,
            "ddim_timesteps": result.ddim_timesteps,
            "report": line,
            "seconds": round(seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if peak_vram_bytes is not None:  # CUDA runs only: a CPU run has no VRAM figure
            record["peak_vram_bytes"] = peak_vram_bytes
        return record
