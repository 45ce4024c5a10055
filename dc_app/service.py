"""What the UI, the API and the CLI call: one method per endpoint, around one loaded model.

Each method validates every field (one table: dc_app.settings), picks the seed and the sampler(s), runs the
pipeline under the device lock, writes the mp4 and its JSON, and returns a `GenerationResult` (dc_app.result):
data, from which the report in plain words is rendered. A request ends with a result or a `UserFacingError`
whose message can be shown as it is; whatever happens, no partial file is left behind and the next request works.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .loading.spec import UPSTREAM_SPACINGS, ModelDefaults, ModelSpec, model_spec
from .faults import FaultPlan
from .images import open_image, prepare_image
from .loading import dtype_name, offload_mode
from .memory_estimate import free_memory
from .memory_fit import DOES_NOT_FIT, MemoryFit, MemorySetup, check_fit, held_bytes
from .models.weight_storage import weight_storage_kind
from .loading.background import ModelLoader
from .options import CFG_MODES
from .pipeline import SynthesisResult, image_video, keyframe_video, run_synthesis
from .result import CRASHED, FINITE, NAN, GenerationResult, SamplerOutcome
from .schedule import ddim_timesteps
from .settings import FIELDS_BY_NAME, SEED_RANDOM, GenerationSettings, fields_of
from .stock_failure import StockSamplerFailure
from .storage import OutputStore
from .extend import join_with_upload, last_frame
from .storyboard import MAX_KEYFRAMES, run_storyboard, segment_prompts
from .validation import InputError, UserFacingError, clean_prompt, flag, whole_number
from .video import write_mp4, write_sidecar
from .windows import window_count

log = logging.getLogger("dc_app.service")

_OVERHEAD_S = 20  # encoders, VAE decode, mp4: added to ZeroGPU's duration estimate


class Cancelled(UserFacingError):
    """The person stopped the run; the message says at which step."""


class OutOfMemory(UserFacingError):
    """The device (or the host) ran out of memory; the message suggests what to change."""


class NotEnoughMemory(OutOfMemory):
    """Refused before running: even the low end of the memory estimate exceeds what the device has."""


class RunFailed(UserFacingError):
    """The run could not produce a video (a stock-sampler crash, or an internal error)."""


@dataclass(frozen=True)
class Storyboard:
    """A checked storyboard request: the keyframes at the model's size, a prompt per segment, loop or not."""

    keyframes: tuple[torch.Tensor, ...]
    prompts: tuple[str, ...]
    loop: bool

    def run(self, model, sampler: str, generator, **settings) -> SynthesisResult:
        """The storyboard through the interpolation model, as one SynthesisResult (the joined video)."""
        board = run_storyboard(model, sampler, list(self.keyframes), list(self.prompts), self.loop,
                               generator=generator, **settings)
        first_bad = next((s.nonfinite for s in board.segments if s.nonfinite is not None), None)
        layout = {"keyframes": len(self.keyframes), "loop": self.loop, "segments": len(board.segments),
                  "keyframe_order": board.keyframe_order}
        return SynthesisResult(videos=board.video[None, None], nonfinite=first_bad,
                               ddim_timesteps=board.segments[-1].ddim_timesteps,
                               notices=list(board.segments[-1].notices), long_video=layout)


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


def serving_defaults(defaults: ModelDefaults, decode_chunk_size: int | None) -> ModelDefaults:
    """A model's request defaults under a server-wide decode chunk: the chunk replaces the model's per-frame
    default (a request can still ask for per-frame decode)."""
    return defaults if decode_chunk_size is None else defaults.with_values(perframe_ae=decode_chunk_size == 1)


def decode_chunk(perframe_ae: bool, decode_chunk_size: int | None, frames: int) -> int:
    """Frames the VAE decodes at once for a model trained on `frames`: 1 with per-frame decode, else the server's
    chunk (or all `frames`), never more than `frames`."""
    return 1 if perframe_ae else min(decode_chunk_size or frames, frames)


class Service:
    """Generation jobs on one loaded model; one job at a time per instance (one instance per device)."""

    def __init__(self, model, output_dir: Path | str | None = None, fault: FaultPlan | None = None,
                 store: OutputStore | None = None, fps: int | None = None, decode_chunk_size: int | None = None,
                 cfg_mode: str = "batched"):
        """`model`: a loaded model, or a dc_app.loading.background.ModelLoader still loading one (the service's facts
        come from the model's spec; requests get a plain "still loading" message until it is ready).

        `decode_chunk_size` and `cfg_mode` are the server's settings for every request (app and CLI options
        --decode-chunk-size and --cfg-mode); None keeps the model's per-frame or all-frames decode."""
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode {cfg_mode!r}: expected one of {', '.join(CFG_MODES)}")
        if decode_chunk_size is not None and (isinstance(decode_chunk_size, bool) or int(decode_chunk_size) < 1
                                              or int(decode_chunk_size) != decode_chunk_size):
            raise ValueError(f"decode_chunk_size {decode_chunk_size!r}: expected a whole number of frames, 1 or more")
        self._source = model
        self.spec: ModelSpec = model_spec(model.config)
        self.decode_chunk_size = None if decode_chunk_size is None else int(decode_chunk_size)
        # Every request's defaults (and the UI's and API's, which read these).
        self.defaults = serving_defaults(self.spec.defaults, self.decode_chunk_size)
        self.cfg_mode = cfg_mode
        self.model_name = self.spec.name
        self.store = store or OutputStore(output_dir)
        self.store.sweep()  # results left by an earlier process age out like any other
        self.fault = fault
        self.fps = int(fps or self.defaults.video_fps)
        self._lock = threading.Lock()
        self._stage = "starting"  # what the running job is doing, for error messages (one job at a time)
        self._job_memory: MemoryFit | None = None  # the running job's memory estimate, for its sidecars
        self._estimate_failed = False
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
        """Seeded random weights (tiny models): videos are noise, the page says so."""
        return self.spec.random_weights

    @property
    def is_interp_model(self) -> bool:
        return bool(self.defaults.interp)

    def gpu_seconds(self, steps: Any = None, runs: int = 1) -> int:
        """ZeroGPU duration estimate for a request (bad input gets the default; validation rejects it later)."""
        try:
            n = whole_number("steps", steps, *FIELDS_BY_NAME["steps"].bounds)
        except InputError:
            n = self.defaults.ddim_steps
        return int(min(600, _OVERHEAD_S + runs * n * self.defaults.seconds_per_step))

    # ----------------------------------------------------------------------------------- validation
    def settings_for(self, values: Mapping[str, Any] | None = None, endpoint: str = "generate") -> GenerationSettings:
        """Every field of `values` checked, None or absent replaced by the model's default; raises InputError
        naming the field (also for a field the endpoint does not take)."""
        values = dict(values or {})
        allowed = {f.name for f in fields_of(endpoint)}
        extra = sorted(k for k in values if k in FIELDS_BY_NAME and k not in allowed)
        if extra:
            raise InputError(f"{extra[0]}: not a setting of {endpoint}")
        if self.is_interp_model and values.get("frames") not in (None, self.frames):
            raise InputError(f"frames: interpolation models make exactly their {self.frames} frames; longer videos "
                             f"come from image-to-video models")
        text_encoder = getattr(self.model, "cond_stage_model", None)
        return GenerationSettings.from_request(
            self.defaults, values, num_tokens=getattr(text_encoder, "num_tokens", None),
            context_length=int(getattr(text_encoder, "context_length", 77)))

    # ------------------------------------------------------------------------------------- endpoints
    def generate(self, image, *, progress: Callable[[int, int, str], None] | None = None,
                 cancel: threading.Event | None = None, **values) -> GenerationResult:
        """One video. `values`: the request's settings by name (dc_app.settings.FIELDS); absent or None means
        the model's default."""
        settings = self.settings_for(values, "generate")
        videos = self._i2v_input(image)
        return self._finish(self._run_job(settings, videos, [(settings.sampler, settings.timestep_spacing)],
                                          progress, cancel, interp=False, loop=False))

    def compare(self, image, image2=None, *, progress: Callable[[int, int, str], None] | None = None,
                cancel: threading.Event | None = None, **values) -> GenerationResult:
        """Stock and the chosen sampler (`sampler`, default fixed) on the same seed and noise; `result.stock` is
        the stock run (no video after a crash). On a grid stock cannot run (logsnr), stock runs the model's own
        spacing, and the report says so. Interpolation models compare interpolations: from `image` to `image2`,
        or a loop without it."""
        settings = self.settings_for(values, "compare")
        if self.is_interp_model:
            videos, loop = self._interp_input(image, image2)
        elif image2 is not None:
            raise InputError(f"image2: the {self.model_name} model takes one image; only interpolation models take "
                             f"a second one")
        else:
            videos, loop = self._i2v_input(image), False
        return self._finish(self._run_job(settings, videos, self._compare_runs(settings), progress, cancel,
                                          interp=self.is_interp_model, loop=loop))

    def _compare_runs(self, settings: GenerationSettings) -> list[tuple[str, str]]:
        """(sampler, spacing) of a compare's two runs: stock first, then the sampler asked for."""
        if settings.sampler == "stock":
            raise InputError("sampler: compare runs stock beside another sampler; choose one of "
                             + ", ".join(n for n in FIELDS_BY_NAME["sampler"].choices if n != "stock"))
        spacing = settings.timestep_spacing
        stock_spacing = spacing if spacing in UPSTREAM_SPACINGS else self.defaults.timestep_spacing
        return [("stock", stock_spacing), (settings.sampler, spacing)]

    def interpolate(self, image, image2=None, *, progress: Callable[[int, int, str], None] | None = None,
                    cancel: threading.Event | None = None, **values) -> GenerationResult:
        """Interpolation models: a video from `image` to `image2`; without `image2`, a loop back to `image`."""
        if not self.is_interp_model:
            raise InputError(
                f"interpolate: the {self.model_name} model cannot interpolate; start the app with --model 512_interp"
            )
        settings = self.settings_for(values, "interpolate")
        videos, loop = self._interp_input(image, image2)
        return self._finish(self._run_job(settings, videos, [(settings.sampler, settings.timestep_spacing)],
                                          progress, cancel, interp=True, loop=loop))

    def storyboard(self, keyframes, prompts=None, loop=False, *,
                   progress: Callable[[int, int, str], None] | None = None, cancel: threading.Event | None = None,
                   **values) -> GenerationResult:
        """Interpolation models: 2 to MAX_KEYFRAMES keyframes -> one video through every consecutive pair, each
        shared keyframe once; `loop` closes it back to the first. `prompts`: one per segment (K - 1, or K with
        `loop`), else the `prompt` setting for all of them."""
        if not self.is_interp_model:
            raise InputError(f"storyboard: the {self.model_name} model cannot interpolate; start the app with an "
                             f"interpolation model (--model 512_interp or tooncrafter_512)")
        settings = self.settings_for(values, "storyboard")
        loop = flag("loop", loop)
        if not isinstance(keyframes, (list, tuple)) or not 2 <= len(keyframes) <= MAX_KEYFRAMES:
            got = f"{len(keyframes)} images" if isinstance(keyframes, (list, tuple)) else "no list"
            raise InputError(f"keyframes: expected a list of 2 to {MAX_KEYFRAMES} images, got {got}")
        segments = len(keyframes) - (0 if loop else 1)
        try:
            if prompts is not None and not isinstance(prompts, (list, tuple)):
                raise ValueError("not a list")
            texts = segment_prompts(settings.prompt if prompts is None else [clean_prompt(p)[0] for p in prompts],
                                    segments)
        except InputError:
            raise  # a prompt's own problem, in its own words
        except ValueError:
            raise InputError(f"prompts: expected one prompt, or one per segment ({segments} for {len(keyframes)} "
                             f"keyframes{' with loop' if loop else ''})") from None
        frames, notices, first_size = [], list(settings.notices), None
        for k, image in enumerate(keyframes):
            picture = open_image(image, f"keyframes[{k}]")
            first_size = first_size or picture.size
            if picture.size != first_size:
                notices.append(f"keyframes: keyframe {k + 1} is {picture.size[0]}x{picture.size[1]}, the first "
                               f"{first_size[0]}x{first_size[1]}; each was cropped to the model's frame")
            frames.append(prepare_image(picture, *self.frame_size, field=f"keyframes[{k}]"))
        settings = replace(settings, notices=tuple(notices))
        board = Storyboard(tuple(frames), tuple(texts), loop)
        return self._finish(self._run_job(settings, None, [(settings.sampler, settings.timestep_spacing)], progress,
                                          cancel, interp=True, loop=loop, board=board))

    def extend(self, video, *, progress: Callable[[int, int, str], None] | None = None,
               cancel: threading.Event | None = None, **values) -> GenerationResult:
        """Image-to-video models: continue an uploaded video from its last frame for `frames` more frames, and
        return the two joined (the continuation's first frame re-creates the last one: t + N - 1 frames). Only
        the upload's last frame is decoded here; ffmpeg streams the rest into the joined file. Known drift: the
        model sees one frame, not the motion before it (docs/long-videos.md)."""
        if self.is_interp_model:
            raise InputError(f"extend: the {self.model_name} model interpolates; continue a video with an "
                             f"image-to-video model (--model 512)")
        settings = self.settings_for(values, "extend")
        if video is None:
            raise InputError("video: no video was given")
        last = last_frame(video, field="video")
        result = self._finish(self._run_job(settings, self._i2v_input(last), [(settings.sampler,
                                            settings.timestep_spacing)], progress, cancel, interp=False, loop=False))
        continuation = result.main
        joined = continuation.video.with_name(f".{continuation.video.stem}.joined.mp4")
        try:
            frames = join_with_upload(video, continuation.video, joined, self.frame_size, self.fps)
            os.replace(joined, continuation.video)  # the result is the joined video, under the result's name
        except OSError as err:
            for path in (joined, continuation.video, continuation.sidecar):
                path.unlink(missing_ok=True)
            log.warning("extend: %s", err)
            raise RunFailed("the uploaded video and its continuation could not be joined; nothing was saved") from None
        record = json.loads(continuation.sidecar.read_text())
        record["extend"] = {"continuation_frames": settings.frames, "joined_frames": frames}
        write_sidecar(continuation.sidecar, record)
        return result

    @staticmethod
    def _finish(result: GenerationResult) -> GenerationResult:
        if result.video is None:  # the request's own sampler crashed (stock, asked for alone)
            raise RunFailed(result.report())
        return result

    @staticmethod
    def sidecar_of(video_path: str | Path | None) -> str | None:
        """The JSON of settings written next to a result video."""
        return None if not video_path else str(Path(video_path).with_suffix(".json"))

    # --------------------------------------------------------------------------------------- running
    def _i2v_input(self, image) -> torch.Tensor:
        return image_video(prepare_image(image, *self.frame_size, field="image"), self.frames)

    def _interp_input(self, image, image2) -> tuple[torch.Tensor, bool]:
        """(1 3 t H W frames, loop); without a second image, the first at both ends (a loop)."""
        first = prepare_image(image, *self.frame_size, field="image")
        loop = image2 is None
        last = first if loop else prepare_image(image2, *self.frame_size, field="image2")
        return keyframe_video(first, last, self.frames), loop

    def _acquire(self, cancel: threading.Event | None) -> None:
        # Wait for the device, but give up as soon as the person cancels while waiting.
        while not self._lock.acquire(timeout=0.1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before it started")

    def _decode_chunk(self, settings: GenerationSettings) -> int:
        """Frames the VAE decodes at once: 1 with per-frame decode, else the server's chunk (or all frames)."""
        return decode_chunk(settings.perframe_ae, self.decode_chunk_size, self.frames)

    def _run_job(self, settings: GenerationSettings, videos: torch.Tensor | None, runs: list[tuple[str, str]],
                 progress, cancel, interp: bool, loop: bool, board: Storyboard | None = None) -> GenerationResult:
        """Run each (sampler, spacing) of `runs` on the same seed; whatever fails, nothing written is left."""
        seed = settings.seed if settings.seed != SEED_RANDOM else secrets.randbelow(2**32)
        self._acquire(cancel)
        written: list[Path] = []
        failure: UserFacingError | None = None
        try:
            self._stage = "starting"
            self.store.sweep()
            injected = self.fault.take_free_memory() if self.fault is not None else None
            # After the previous job let go of its memory.
            self._job_memory = fit = self.memory_fit(settings, free=injected)
            if fit is not None and fit.verdict == DOES_NOT_FIT:
                raise NotEnoughMemory(fit.refusal())
            outcomes = []
            for k, (name, spacing) in enumerate(runs):
                label = f"{name} sampler" + (f" ({k + 1} of {len(runs)})" if len(runs) > 1 else "")
                outcomes.append(self._run_one(settings, videos, name, spacing, seed, progress, cancel, label, interp,
                                              loop, written, board))
            memory = () if fit is None else tuple(line for line in (fit.line(), fit.warning()) if line)
            return GenerationResult(settings=settings, seed=seed, model_name=self.model_name,
                                    outcomes=tuple(outcomes), schedule_notes=self._schedule_notes(settings, outcomes),
                                    memory_notes=memory)
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

    def _run_one(self, settings: GenerationSettings, videos: torch.Tensor | None, sampler: str, spacing: str,
                 seed: int, progress, cancel, label: str, interp: bool, loop: bool, written: list[Path],
                 board: Storyboard | None = None) -> SamplerOutcome:
        model = self.model
        h, w = model.image_size
        noise_shape = [1, model.channels, settings.frames, h, w]
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

        def on_unet_call(done, total):
            # Longer videos run several windows per step: progress counts UNet calls, and cancel acts within one.
            if progress is not None and total:
                progress(done, total, f"{label}, UNet call")
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step_now[0] + 1}, UNet call {done} of {total}")

        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        self._stage = f"sampling with the {sampler} sampler"
        peak = PeakMemory(model.device)
        decode_chunk = self._decode_chunk(settings)
        common = dict(ddim_steps=settings.steps, ddim_eta=settings.eta, unconditional_guidance_scale=settings.cfg_scale,
                      fs=settings.fs, timestep_spacing=spacing, guidance_rescale=settings.guidance_rescale,
                      callback=on_step, decode_chunk_size=decode_chunk, batched_cfg=self.cfg_mode == "batched")
        try:
            with peak:
                if board is not None:
                    result = board.run(model, sampler, generator, **common)
                else:
                    result = run_synthesis(
                        model, sampler, [settings.prompt], videos, noise_shape, n_samples=1, interp=interp,
                        loop=loop, generator=generator, **common,
                        **({"frames": settings.frames, "on_unet_call": on_unet_call}
                           if settings.frames != self.frames else {}),
                    )
        except (torch.OutOfMemoryError, MemoryError):
            raise OutOfMemory(
                f"out of memory on {model.device.type} at step {step_now[0]} of the {self.model_name} model: "
                f"start with --low-vram (or one of its parts: --dtype bf16, --weights-dtype int8, --ff-chunk-size "
                f"4096, --offload all, --cfg-mode two-call), turn on VAE per-frame decode, ask fewer frames, or "
                f"use a smaller model (512 or 256); fewer steps do not lower the peak"
            ) from None
        except Cancelled:
            log.info("%s: cancelled at step %d", label, step_now[0])
            raise
        except StockSamplerFailure as err:
            if sampler != "stock":
                raise  # only upstream's own code path fails like upstream: elsewhere it is a bug
            # Upstream's sampler fails on some settings; that is what the compare view exists to show.
            return SamplerOutcome(sampler, CRASHED, time.perf_counter() - started, spacing=spacing,
                                  peak_bytes=peak.bytes, crash_reason=str(err))

        video = result.videos[0, 0]  # 3 t H W
        mp4, sidecar = self.store.new_paths(sampler)
        frame_hook = None if self.fault is None else (lambda i: self.fault.at_frame(i + 1))
        written.append(mp4)
        self._stage = "writing the video"
        write_mp4(video, mp4, fps=self.fps, on_frame=frame_hook)
        outcome = self._outcome(sampler, spacing, result, video, time.perf_counter() - started, peak.bytes, mp4,
                                sidecar)
        written.append(sidecar)
        write_sidecar(sidecar, self._sidecar(settings, seed, outcome, decode_chunk, interp, loop, result.long_video))
        return outcome

    @staticmethod
    def _outcome(sampler: str, spacing: str, result, video: torch.Tensor, seconds: float, peak_bytes: int | None,
                 mp4: Path, sidecar: Path) -> SamplerOutcome:
        """What a finished run amounts to: finite, or where NaN appeared and how much of the video it blacked out."""
        black_share = float((~torch.isfinite(video)).float().mean())
        timesteps = tuple(int(t) for t in result.ddim_timesteps)
        nf = result.nonfinite
        status = FINITE if nf is None and black_share == 0 else NAN
        return SamplerOutcome(
            sampler, status, seconds, spacing=spacing, video=mp4, sidecar=sidecar, peak_bytes=peak_bytes,
            timesteps=timesteps, nan_step=None if nf is None else int(nf["step"]) + 1,
            nan_timestep=None if nf is None else int(nf["timestep"]), black_share=black_share,
            notices=tuple(result.notices))

    # ------------------------------------------------------------------------------------------ memory
    def memory_setup(self, settings: GenerationSettings) -> MemorySetup:
        """What the memory estimate needs: the loaded model's options, the service's, the request's."""
        model = self.model
        return MemorySetup(model=model.config, frames=settings.frames, dtype=dtype_name(model.dtype),
                           vae_dtype=dtype_name(model.vae_dtype),
                           weights_dtype=weight_storage_kind(model.model.diffusion_model),
                           ff_chunking=model.ff_chunking, cfg_mode=self.cfg_mode,
                           decode_chunk_size=self._decode_chunk(settings), offload=offload_mode(model),
                           device_type=model.device.type)

    def memory_fit(self, settings: GenerationSettings, free: int | None = None) -> MemoryFit | None:
        """The memory estimate of a request against the device's free memory (`free`: bytes instead of asking
        the device; fault injection); None where there is none to make (a device other than a GPU or the CPU),
        or when the estimate itself fails: that is logged and the run goes ahead, as before estimates existed."""
        device = self.model.device
        if device.type not in ("cuda", "cpu"):
            return None
        try:
            free = free_memory(device) if free is None else free
        except (RuntimeError, OSError):
            return None  # no device to ask here (ZeroGPU's main process holds no GPU between calls)
        try:
            return check_fit(self.memory_setup(settings), free, held_bytes(self.model))
        except Exception:
            if not self._estimate_failed:  # once in full; the page asks on every change of the frames
                log.exception("the memory estimate failed; running without it")
            self._estimate_failed = True
            return None

    def memory_line(self, endpoint: str = "generate", frames=None, perframe_ae=None) -> str:
        """The UI's line next to Generate for these settings (defaults for what is not given)."""
        if self.model_status[0] != "ready":
            return "Memory: estimated once the model has loaded."
        taken = {f.name for f in fields_of(endpoint)}
        values = {k: v for k, v in (("frames", frames), ("perframe_ae", perframe_ae)) if v is not None and k in taken}
        try:
            settings = self.settings_for(values, endpoint)
        except InputError as err:
            return str(err)
        fit = self.memory_fit(settings)
        return fit.line() if fit is not None else ""

    def _free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    # --------------------------------------------------------------------------------------- reports
    def _schedule_notes(self, settings: GenerationSettings, outcomes: list[SamplerOutcome]) -> tuple[str, ...]:
        """What the spacing did to the step count, what the fixed sampler repaired, and which spacing stock ran
        when it cannot run the one asked for, in words."""
        notes = []
        if getattr(self.model, "temporal_decoder", False) and (settings.perframe_ae or self.decode_chunk_size):
            # ToonCrafter's decoder mixes frames (GroupNorm statistics and references span the chunk).
            notes.append(f"VAE: this model's decoder is temporal and always decodes {self.frames} frames at once; "
                         f"per-frame decode and --decode-chunk-size do not apply to it")
        if settings.frames != self.frames:
            windows = window_count(settings.frames, self.frames)
            notes.append(f"frames: {settings.frames} from {windows} overlapping windows of {self.frames} frames; "
                         f"about {windows}x the UNet time of a {self.frames}-frame video")
        stock = next((o for o in outcomes if o.sampler == "stock"), None)
        if stock is not None and stock.spacing != settings.timestep_spacing:
            notes.append(f"stock: runs upstream's spacings only; it ran {stock.spacing} (the model's default), "
                         f"not {settings.timestep_spacing}")
        if settings.timestep_spacing not in UPSTREAM_SPACINGS:
            return tuple(notes)  # dc_app's own grids: every timestep valid, the step count as asked
        upstream = [int(t) for t in ddim_timesteps(settings.timestep_spacing, settings.steps,
                                                   self.model.num_timesteps)]
        if len(upstream) != settings.steps:
            notes.append(f"steps: {settings.timestep_spacing} spacing runs {len(upstream)} steps for the "
                         f"{settings.steps} asked (upstream's rounding, kept so results match upstream's)")
        invalid = [t for t in upstream if not 0 <= t < self.model.num_timesteps]
        repaired = next((o for o in outcomes if o.sampler != "stock" and o.timesteps), None)
        if invalid and repaired is not None:
            replaced = sorted(set(repaired.timesteps) - set(upstream))
            notes.append(f"{repaired.sampler}: timestep {', '.join(map(str, invalid))} is outside "
                         f"0..{self.model.num_timesteps - 1}; it ran {', '.join(map(str, replaced))} instead")
        return tuple(notes)

    def _memory_record(self) -> dict | None:
        """The running job's memory estimate for its sidecars (None: no estimate was made)."""
        fit = self._job_memory
        if fit is None:
            return None
        low, high = fit.estimate.total
        return {"low_bytes": low, "high_bytes": high, "peak_phase": fit.estimate.peak_phase,
                "available_bytes": fit.available, "verdict": fit.verdict}

    def _sidecar(self, settings: GenerationSettings, seed: int, outcome: SamplerOutcome, decode_chunk: int,
                 interp: bool, loop: bool, long_video: dict | None = None) -> dict:
        record = {
            "model": self.model_name,
            **settings.as_dict(),
            "sampler": outcome.sampler,
            "timestep_spacing": outcome.spacing,
            "seed": seed,
            "interp": interp,
            "loop": loop,
            # frames (in the settings) past the trained T: the windows, stride, noise rescheduling, UNet calls
            "long_video": {k: v for k, v in (long_video or {}).items() if k != "frames"},
            "size": list(self.frame_size),
            "fps": self.fps,
            "device": str(self.model.device),
            # Spelled as the options take them (--dtype bf16 ...), so a run can be repeated from its sidecar.
            "dtype": dtype_name(self.model.dtype),
            "vae_dtype": dtype_name(self.model.vae_dtype),
            "offload": offload_mode(self.model),
            "decode_chunk_size": decode_chunk,
            "cfg_mode": self.cfg_mode,
            "weights_dtype": weight_storage_kind(self.model.model.diffusion_model),
            "ff_chunk_size": None if self.model.ff_chunking is None else str(self.model.ff_chunking),
            "memory_estimate": self._memory_record(),
            "ddim_timesteps": list(outcome.timesteps),
            "report": outcome.line(),
            "notices": list(settings.notices + outcome.notices),
            "seconds": round(outcome.seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if outcome.peak_bytes is not None:  # CUDA runs only: a CPU run has no VRAM figure
            record["peak_vram_bytes"] = outcome.peak_bytes
        return record
