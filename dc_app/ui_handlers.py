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
import inspect
import logging
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
from gradio import FileData
from gradio import utils as gradio_utils

from .schedule_view import schedule_view
from .service import Service
from .settings import FIELDS_BY_NAME, fields_of
from .uploads import UploadRule
from .validation import SEED_MAX, InputError, UserFacingError, flag
from .windows import window_count

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


def _file(path: str | Path | None) -> FileData | None:
    return None if path is None else FileData(path=str(path))


def _with_signature(fn: Callable, params: list[inspect.Parameter], returns: Any, name: str, doc: str) -> Callable:
    """`fn(*args)` presented to Gradio as a function of `params`: gr.api reads the parameter names, types and
    defaults from the signature, and Gradio passes the inputs (and gr.Progress) positionally in that order."""
    fn.__signature__ = inspect.Signature(params, return_annotation=returns)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _setting_params(service: Service, endpoint: str) -> list[inspect.Parameter]:
    """One parameter per setting of `endpoint` (dc_app.settings.FIELDS), with the model's default."""
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default_for(service.defaults),
                              annotation=f.python_type) for f in fields_of(endpoint)]


_IMAGE = inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=FileData)
_VIDEO = inspect.Parameter("video", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=FileData)
_KEYFRAMES = inspect.Parameter("keyframes", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[FileData])
_PROMPTS = inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                             annotation=Optional[list[str]])
_LOOP = inspect.Parameter("loop", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False, annotation=bool)
_IMAGE2 = inspect.Parameter("image2", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                            annotation=Optional[FileData])

# What each endpoint answers, as the API has always answered it: (mp4, report, seed used) for one video,
# (stock mp4 or None after a stock crash, fixed mp4, report) for a compare. The return types are given as text,
# as the first release's `from __future__ import annotations` functions gave them: gr.api then sends the tuple as
# one output, which is the answer shape API callers already rely on (a real tuple type would make three).
_RETURNS = {
    "generate": ("tuple[FileData, str, int]", lambda r: (_file(r.video), r.report(), r.seed)),
    "compare": ("tuple[FileData | None, FileData, str]",
                lambda r: (_file(r.stock.video), _file(r.video), r.report())),
    "interpolate": ("tuple[FileData, str, int]", lambda r: (_file(r.video), r.report(), r.seed)),
    "storyboard": ("tuple[FileData, str, int]", lambda r: (_file(r.video), r.report(), r.seed)),
    "extend": ("tuple[FileData, str, int]", lambda r: (_file(r.video), r.report(), r.seed)),
}
_DOCS = {
    "generate": "Image to video. Returns (mp4, report, seed used).",
    "compare": "Stock and fixed samplers on the same seed and noise. Returns (stock mp4 or None, fixed mp4, report).",
    "interpolate": "Interpolation models: a video from image to image2 (without image2: a loop). "
                   "Returns (mp4, report, seed used).",
    "extend": "Image-to-video models: continue an uploaded video (at most 50 MB and 120 s) from its last frame "
              "for `frames` more frames. Returns (joined mp4, report, seed used).",
    "storyboard": "Interpolation models: 2 or more keyframes joined through every consecutive pair (loop: back "
                  "to the first); prompts: one per segment, else prompt for all. Returns (mp4, report, seed used).",
}


def _keyframe_paths(rule: UploadRule, value: Any) -> list[str]:
    """Every keyframe checked against the upload rule, like any other image field."""
    if not isinstance(value, list):
        raise gr.Error("keyframes: expected a list of uploaded images", print_exception=False)
    return [_payload_path(rule, item, f"keyframes[{k}]") for k, item in enumerate(value)]


def api_functions(service: Service, rule: UploadRule | None = None) -> dict[str, Callable]:
    """The named API endpoints, generated from the settings table: `image` (and `image2` for /interpolate),
    then one parameter per setting, with the model's defaults."""
    rule = rule or upload_rule(service)
    endpoints = ["generate", "compare"] + (["interpolate", "storyboard"] if service.is_interp_model else ["extend"])
    return {name: _api_endpoint(service, rule, name) for name in endpoints}


def _api_endpoint(service: Service, rule: UploadRule, endpoint: str) -> Callable:
    runs = 2 if endpoint == "compare" else 1
    gpu_call = on_device(service, endpoint, runs=runs)
    # Interpolation models compare interpolations: /compare takes image2 too.
    images = [_IMAGE, _IMAGE2] if endpoint == "interpolate" or (
        endpoint == "compare" and service.is_interp_model) else [_IMAGE]
    if endpoint == "storyboard":
        images = [_KEYFRAMES, _PROMPTS, _LOOP]
    elif endpoint == "extend":
        images = [_VIDEO]
    params = images + _setting_params(service, endpoint)
    names = [p.name for p in params]
    returns, answer = _RETURNS[endpoint]

    async def call(*args, **kwargs):
        values = {**{p.name: p.default for p in params if p.default is not p.empty}, **dict(zip(names, args)),
                  **kwargs}
        if endpoint == "storyboard":
            files = {"keyframes": _keyframe_paths(rule, values.pop("keyframes", None)),
                     "prompts": values.pop("prompts", None), "loop": values.pop("loop", False)}
        else:
            files = {p.name: _payload_path(rule, values.pop(p.name, None), p.name) for p in images}
        return answer(await run_cancellable(gpu_call, **files, **values))

    return _with_signature(call, params, returns, endpoint, _DOCS[endpoint])


# ------------------------------------------------------------------------------------------ UI handlers


def _progress_adapter(progress: gr.Progress) -> Callable[[int, int, str], None]:
    return lambda step, total, label: progress((step, total), desc=f"{label}: step {step} of {total}")


_PROGRESS = inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())
_COMPARE = inspect.Parameter("compare", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False, annotation=bool)


def _panes(result, label: str, with_stock: bool = False) -> tuple:
    """A tab's eight outputs for `result`: stock column visibility, stock video and its line, the video (labelled)
    and its line, the report, the seed used and the settings file. Each video gets its own line of the report
    (time included) right under it."""
    stock = (gr.update(visible=True), _path(result.stock.video), result.stock.line()) if with_stock else \
        (gr.update(visible=False), None, "")
    main = result.main
    return (*stock, gr.update(value=_path(main.video), label=label), main.line(), result.report(), result.seed,
            _path(result.sidecar))


def ui_run(service: Service, rule: UploadRule | None = None, interp: bool = False) -> Callable:
    """A tab's Generate (or Interpolate) button: one sampler, or stock beside it when `compare` is on.

    Inputs: the image (and, on the interpolation tab, image2), the settings in the table's order, then the
    compare switch. Outputs: stock column visibility, stock video and its line, the video and its line, the
    report, the seed used and the settings file.
    """
    rule = rule or upload_rule(service)
    endpoint = "interpolate" if interp else "generate"
    one_gpu = on_device(service, endpoint)
    cmp_gpu = on_device(service, "compare", runs=2)
    settings = [f.name for f in fields_of(endpoint)]
    images = [_IMAGE, _IMAGE2] if interp else [_IMAGE]

    async def run(*args):
        *values, compare, progress = args
        files = {p.name: _payload_path(rule, v, p.name) for p, v in zip(images, values)}
        values = dict(zip(settings, values[len(images):]))
        try:
            # The browser sends a bool; an API caller of this private event could send anything.
            compare = flag("compare", compare)
        except InputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        result = await run_cancellable(cmp_gpu if compare else one_gpu, **files,
                                       progress=_progress_adapter(progress), **values)
        return _panes(result, f"{result.main.sampler} sampler", with_stock=compare)

    params = images + _setting_params(service, endpoint) + [_COMPARE, _PROGRESS]
    return _with_signature(run, params, tuple, "run", ui_run.__doc__)


def ui_storyboard(service: Service, rule: UploadRule | None = None) -> Callable:
    """The interpolation tab's storyboard button. Inputs: the keyframe uploads, an optional order ("3 1 2": the
    uploads' numbers in the order to play; numbers left out are dropped), optional prompts (one line per
    segment), loop, then the settings of /storyboard in the table's order. Outputs as ui_run's."""
    rule = rule or upload_rule(service)
    gpu_call = on_device(service, "storyboard")
    settings = [f.name for f in fields_of("storyboard")]

    async def run(files, order, prompts, loop, *args):
        *values, progress = args
        try:
            keyframes = _ordered(_keyframe_paths(rule, files if files is not None else []), order)
            loop = flag("loop", loop)
            if not isinstance(prompts, (str, type(None))):
                raise InputError("prompts: expected text, one line per segment")
        except InputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        result = await run_cancellable(gpu_call, keyframes=keyframes, prompts=lines or None, loop=loop,
                                       progress=_progress_adapter(progress), **dict(zip(settings, values)))
        return _panes(result, "storyboard")

    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for name in ("files", "order", "prompts", "loop")] + _setting_params(service, "storyboard") + [_PROGRESS]
    return _with_signature(run, params, tuple, "run", ui_storyboard.__doc__)


def ui_extend(service: Service, rule: UploadRule | None = None) -> Callable:
    """The image-to-video tab's Extend button: the uploaded video, then the settings of /extend in the table's
    order. Outputs as ui_run's."""
    rule = rule or upload_rule(service)
    gpu_call = on_device(service, "extend")
    settings = [f.name for f in fields_of("extend")]

    async def run(video, *args):
        *values, progress = args
        result = await run_cancellable(gpu_call, video=_payload_path(rule, video, "video"),
                                       progress=_progress_adapter(progress), **dict(zip(settings, values)))
        return _panes(result, "extended video")

    params = [_VIDEO] + _setting_params(service, "extend") + [_PROGRESS]
    return _with_signature(run, params, tuple, "run", ui_extend.__doc__)


def _ordered(paths: list[str], order: Any) -> list[str]:
    """`paths` in the order the person typed ("3 1 2", commas too); empty: as uploaded."""
    if order is None or (isinstance(order, str) and not order.strip()):
        return paths
    if not isinstance(order, str):
        raise InputError("order: expected the keyframes' numbers, e.g. 3 1 2")
    words = order.replace(",", " ").split()
    if not all(w.isdigit() and 1 <= int(w) <= len(paths) for w in words) or len(set(words)) != len(words):
        raise InputError(f"order: expected different numbers from 1 to {len(paths)} (the uploads), e.g. 3 1 2")
    return [paths[int(w) - 1] for w in words]


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def ui_schedule(service: Service) -> Callable:
    """Schedule plot for the current steps, eta, spacing and sampler; out-of-range slider states show a note
    instead. The curves are the DDIM pair's (stock and fixed); the note names the sampler and grid chosen."""

    def plot(steps, eta, timestep_spacing, sampler="fixed"):
        state, status = service.model_status
        if state != "ready":
            return None, f"The schedule plot appears once the model is loaded ({status})."
        try:
            s = service.settings_for(dict(steps=steps, eta=eta, timestep_spacing=timestep_spacing, sampler=sampler))
        except InputError as err:
            return None, str(err)
        table, note = schedule_view(service.model, s.steps, s.eta, s.timestep_spacing)
        if s.sampler not in ("fixed", "stock"):
            note += (f" Chosen: {s.sampler} on the {s.timestep_spacing} grid, the same {s.steps} timesteps; it has "
                     f"no DDIM sigma, and every step of it is finite.")
        return table, note

    return plot


def frames_cost(service: Service) -> Callable:
    """The line beside the frames slider: how many windows N frames take, and what that costs."""
    T = service.frames

    def cost(frames) -> str:
        try:
            # The field's own check: it needs no loaded model (the page draws this line while it loads).
            n = FIELDS_BY_NAME["frames"].check(frames, service.defaults)
        except InputError as err:
            return str(err)
        if n == T:
            return f"{T} frames: the length the model was trained on, one UNet pass per step."
        windows = window_count(n, T)
        return (f"{n} frames: {windows} overlapping windows of {T}, about {windows}x the UNet time of a "
                f"{T}-frame video.")

    return cost


def memory_fields(endpoint: str) -> list[str]:
    """The settings of `endpoint` the memory estimate depends on, in the order ui_memory's handler takes them."""
    taken = {f.name for f in fields_of(endpoint)}
    return [name for name in ("frames", "perframe_ae") if name in taken]


def ui_memory(service: Service, endpoint: str) -> Callable:
    """The line next to Generate: the memory the run would need against what the device has free; takes the
    controls of memory_fields(endpoint)."""
    names = memory_fields(endpoint)

    def line(*values) -> str:
        return service.memory_line(endpoint, **dict(zip(names, values)))

    return line


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

    def tick(steps, eta, timestep_spacing, sampler="fixed"):
        state, status = service.model_status  # read once: the banner and the timer agree
        text = model_banner(state, status)
        return (gr.update(value=text, visible=bool(text)), gr.Timer(active=state == "loading"),
                *plot(steps, eta, timestep_spacing, sampler))

    return tick

