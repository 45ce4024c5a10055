"""Glue between Gradio and the service: cancellation, the named API functions and the UI event handlers.
Each handler only adapts arguments and results; the work is in dc_app.service.

The UI events run with `preprocess=False`, like the gr.api endpoints: the handlers get what the browser sent
(the uploaded file's payload, the slider numbers), and dc_app.images / dc_app.validation check it. Gradio's
own preprocessing would open the image with Pillow first and range-check sliders in its own words; this way a
browser and an API caller get the same checks and the same messages.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio import FileData
from gradio import utils as gradio_utils

from .config import TIMESTEP_SPACINGS
from .schedule_view import schedule_view
from .service import Service
from .uploads import UploadRule
from .validation import SEED_MAX, InputError, UserFacingError, flag

log = logging.getLogger("dc_app.ui")


# Services by key, for ZeroGPU's worker (see on_device).
_SERVICES: dict[int, Service] = {}


def _call_service(key: int, method: str, kwargs: dict) -> Any:
    """What ZeroGPU runs on its GPU worker. The worker is a fork of this process, so it has the service; only
    the key, the method name and plain request values cross over (a bound method would drag the model along)."""
    return getattr(_SERVICES[key], method)(**kwargs)


def on_device(service: Service, method: str, runs: int = 1) -> Callable[..., Any]:
    """`service.<method>`, run under @spaces.GPU(duration=...) on Hugging Face ZeroGPU (when the `spaces`
    package is importable), as it is elsewhere. `runs`: samplers per request, for the duration estimate."""
    try:
        import spaces
    except ImportError:
        return getattr(service, method)
    _SERVICES[id(service)] = service

    def duration(key, method_name, kwargs):
        return service.gpu_seconds(kwargs.get("steps"), runs)

    gpu_call = spaces.GPU(duration=duration)(_call_service)

    def call(cancel=None, progress=None, **kwargs):
        # A threading.Event and a progress callback cannot reach another process: on ZeroGPU a run ends at its
        # last step or at ZeroGPU's own time limit.
        return gpu_call(id(service), method, kwargs)

    return call


async def run_cancellable(fn: Callable, /, **kwargs) -> Any:
    """Run a blocking service call in a worker thread; if Gradio cancels the event (the Cancel button, a
    client's job.cancel()), tell the run to stop: it does so within one step.

    Gradio runs plain functions through anyio, which cannot be interrupted: the event would look cancelled
    while the sampler kept the device busy to the end. The context is copied so gr.Progress still reaches
    the right event from the worker thread.
    """
    cancel = threading.Event()
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, cancel=cancel, **kwargs)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, call)
    except asyncio.CancelledError:
        cancel.set()
        raise
    except UserFacingError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:
        # Not expected anywhere (the service turns run failures into UserFacingError): log it in full, answer
        # in plain words without internals.
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        raise gr.Error(f"internal error ({type(err).__name__}); the app is still running: please try again",
                       print_exception=False) from None


def upload_rule(service: Service) -> UploadRule:
    """The app's rule for input files: Gradio's upload folder and assets/, never the results folder."""
    return UploadRule.for_app(gradio_utils.get_upload_folder(), service.store.dir)


def _payload_path(rule: UploadRule, value: Any, field: str) -> str | None:
    """The uploaded file's server path, checked against `rule` (None when nothing was uploaded: the service
    says so in its words)."""
    try:
        return rule.uploaded_path(value, field)
    except InputError as err:
        raise gr.Error(str(err), print_exception=False) from None


def _file(path: str | None) -> FileData | None:
    return None if path is None else FileData(path=path)


def api_functions(service: Service, rule: UploadRule | None = None) -> dict[str, Callable]:
    """The named API endpoints: the service's arguments and defaults, typed for gr.api."""
    d = service.defaults
    rule = rule or upload_rule(service)
    gen_gpu = on_device(service, "generate")
    cmp_gpu = on_device(service, "compare", runs=2)
    int_gpu = on_device(service, "interpolate")

    async def generate(image: FileData, prompt: str = "", steps: int = d.ddim_steps, eta: float = d.ddim_eta,
                       cfg_scale: float = d.cfg_scale, fs: int = d.fs, seed: int = -1,
                       guidance_rescale: float = d.guidance_rescale, timestep_spacing: str = d.timestep_spacing,
                       sampler: str = "fixed", perframe_ae: bool = d.perframe_ae) -> tuple[FileData, str, int]:
        """Image to video. Returns (mp4, report, seed used)."""
        video, report, seed_used = await run_cancellable(
            gen_gpu, image=_payload_path(rule, image, "image"), prompt=prompt, steps=steps, eta=eta,
            cfg_scale=cfg_scale, fs=fs, seed=seed, guidance_rescale=guidance_rescale,
            timestep_spacing=timestep_spacing, sampler=sampler, perframe_ae=perframe_ae)
        return _file(video), report, seed_used

    async def compare(image: FileData, prompt: str = "", steps: int = d.ddim_steps, eta: float = d.ddim_eta,
                      cfg_scale: float = d.cfg_scale, fs: int = d.fs, seed: int = -1,
                      guidance_rescale: float = d.guidance_rescale, timestep_spacing: str = d.timestep_spacing,
                      perframe_ae: bool = d.perframe_ae) -> tuple[FileData | None, FileData, str]:
        """Stock and fixed samplers on the same seed and noise. Returns (stock mp4 or None, fixed mp4, report)."""
        stock, fixed, report = await run_cancellable(
            cmp_gpu, image=_payload_path(rule, image, "image"), prompt=prompt, steps=steps, eta=eta,
            cfg_scale=cfg_scale, fs=fs, seed=seed, guidance_rescale=guidance_rescale,
            timestep_spacing=timestep_spacing, perframe_ae=perframe_ae)
        return _file(stock), _file(fixed), report

    async def interpolate(image: FileData, image2: FileData | None = None, prompt: str = "",
                          steps: int = d.ddim_steps, eta: float = d.ddim_eta, cfg_scale: float = d.cfg_scale,
                          fs: int = d.fs, seed: int = -1, guidance_rescale: float = d.guidance_rescale,
                          timestep_spacing: str = d.timestep_spacing, sampler: str = "fixed",
                          perframe_ae: bool = d.perframe_ae) -> tuple[FileData, str, int]:
        """512_interp: a video from image to image2 (without image2: a loop). Returns (mp4, report, seed used)."""
        video, report, seed_used = await run_cancellable(
            int_gpu, image=_payload_path(rule, image, "image"), image2=_payload_path(rule, image2, "image2"), prompt=prompt,
            steps=steps, eta=eta, cfg_scale=cfg_scale, fs=fs, seed=seed, guidance_rescale=guidance_rescale,
            timestep_spacing=timestep_spacing, sampler=sampler, perframe_ae=perframe_ae)
        return _file(video), report, seed_used

    endpoints = {"generate": generate, "compare": compare}
    if service.is_interp_model:
        endpoints["interpolate"] = interpolate
    return endpoints


# ------------------------------------------------------------------------------------------ UI handlers


def _progress_adapter(progress: gr.Progress) -> Callable[[int, int, str], None]:
    return lambda step, total, label: progress((step, total), desc=f"{label}: step {step} of {total}")


def ui_run(service: Service, rule: UploadRule | None = None) -> Callable:
    """Generate button: one sampler, or stock and fixed side by side when `compare` is on."""
    rule = rule or upload_rule(service)
    gen_gpu = on_device(service, "generate")
    cmp_gpu = on_device(service, "compare", runs=2)

    async def run(image, prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing, sampler,
                  perframe_ae, compare, progress=gr.Progress()):
        try:
            # The browser sends a bool; an API caller of this private event could send anything.
            compare = flag("compare", compare)
        except InputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        args = dict(image=_payload_path(rule, image, "image"), prompt=prompt, steps=steps, eta=eta, cfg_scale=cfg_scale,
                    fs=fs, seed=seed, guidance_rescale=guidance_rescale, timestep_spacing=timestep_spacing,
                    perframe_ae=perframe_ae, progress=_progress_adapter(progress))
        if compare:
            stock, fixed, report = await run_cancellable(cmp_gpu, **args)
            stock_line, fixed_line = report.splitlines()[:2]
            # Each video gets its own line of the report (time included) right under it.
            return (gr.update(visible=True), stock, stock_line, gr.update(value=fixed, label="fixed sampler"),
                    fixed_line, report, _seed_in(Path(fixed)), Service.sidecar_of(fixed))
        video, report, seed_used = await run_cancellable(gen_gpu, sampler=sampler, **args)
        return (gr.update(visible=False), None, "", gr.update(value=video, label=f"{sampler} sampler"),
                report.splitlines()[0], report, seed_used, Service.sidecar_of(video))

    return run


def ui_interpolate(service: Service, rule: UploadRule | None = None) -> Callable:
    rule = rule or upload_rule(service)
    int_gpu = on_device(service, "interpolate")

    async def run(image, image2, prompt, steps, eta, cfg_scale, fs, seed, guidance_rescale, timestep_spacing,
                  sampler, perframe_ae, progress=gr.Progress()):
        video, report, seed_used = await run_cancellable(
            int_gpu, image=_payload_path(rule, image, "image"), image2=_payload_path(rule, image2, "image2"), prompt=prompt,
            steps=steps, eta=eta, cfg_scale=cfg_scale, fs=fs, seed=seed, guidance_rescale=guidance_rescale,
            timestep_spacing=timestep_spacing, sampler=sampler, perframe_ae=perframe_ae,
            progress=_progress_adapter(progress))
        return video, report, seed_used, Service.sidecar_of(video)

    return run


def _seed_in(video: Path) -> int | None:
    """The seed a compare run used, from its JSON (compare's API answer has no seed of its own)."""
    try:
        return int(json.loads(video.with_suffix(".json").read_text())["seed"])
    except (OSError, ValueError, KeyError):
        return None


def random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def ui_schedule(service: Service) -> Callable:
    """Schedule plot for the current steps, eta and spacing; out-of-range slider states show a note instead."""

    def plot(steps, eta, timestep_spacing):
        state, status = service.model_status
        if state != "ready":
            return None, f"The schedule plot appears once the model is loaded ({status})."
        try:
            req = service.validate("", steps, eta, None, None, -1, None, timestep_spacing, None)
        except InputError as err:
            return None, str(err)
        return schedule_view(service.model, req.steps, req.eta, req.timestep_spacing)

    return plot


def model_banner(state: str, status: str) -> str:
    """The model-status banner for `Service.model_status`: empty (hidden) once the model is ready."""
    if state == "ready":
        return ""
    if state == "failed":
        return f"**The model could not be loaded:** {status}. The app cannot generate until it is restarted."
    return f"**The model is still loading:** {status}. The page works meanwhile; generating waits for it."


def ui_model_status(service: Service) -> Callable:
    """Timer tick and page load: the banner, whether the timer keeps ticking (only while loading), and the
    schedule plot (drawn once the model is there)."""
    plot = ui_schedule(service)

    def tick(steps, eta, timestep_spacing):
        state, status = service.model_status  # read once: the banner and the timer agree
        text = model_banner(state, status)
        return (gr.update(value=text, visible=bool(text)), gr.Timer(active=state == "loading"),
                *plot(steps, eta, timestep_spacing))

    return tick


SPACINGS = list(TIMESTEP_SPACINGS)
