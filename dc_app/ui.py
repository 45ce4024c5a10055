"""The Gradio page and the named API: layout and event wiring only (handlers: dc_app.ui_handlers)."""
from __future__ import annotations

import logging

import gradio as gr
from gradio.exceptions import InvalidPathError

from .service import Service
from .settings import FIELDS_BY_NAME, Field, fields_of
from .storage import MIN_KEEP_S
from .uploads import ASSETS_DIR, NOT_AN_UPLOAD
from .ui_handlers import (
    api_functions,
    frames_cost,
    memory_fields,
    model_banner,
    random_seed,
    ui_memory,
    ui_model_status,
    ui_run,
    ui_schedule,
    ui_extend,
    ui_storyboard,
    upload_rule,
)
from .validation import SEED_MAX

log = logging.getLogger("dc_app.ui")
CONCURRENCY_ID = "device"  # every generating event shares one slot: one generation per device at a time
UI_MAX_STEPS = FIELDS_BY_NAME["steps"].ui_max  # the slider's end; the API accepts up to 1000
FS_LABELS = {"frame stride": "frame stride", "fps": "motion, as fps"}
STATUS_REFRESH_S = 2.0     # how often the page asks what the loading model is doing
# Gradio's cache (uploads, copies of results): swept every 30 min, files older than 2 h removed.
DELETE_CACHE = (1800, 2 * MIN_KEEP_S)

THEME = gr.themes.Soft()
# Stock in warm colours, fixed in cool ones; where the two agree the fixed line covers the stock one.
PLOT_COLOURS = {"stock sigma": "#d62728", "stock 1 - a_prev - sigma^2": "#ff7f0e",
                "fixed sigma": "#1f77b4", "fixed 1 - a_prev - sigma^2": "#17becf"}
PLOT_CAPTION = ("sigma: stock red, fixed blue; 1 - a_prev - sigma^2 (the square-root argument): stock orange, "
                "fixed teal. Where they agree, the fixed line covers the stock one.")
CSS = """
#model-status { background: #e7f1ff; border: 1px solid #5b8def; border-radius: 6px; padding: 4px 12px; }
#test-model-banner { background: #fff3cd; border: 1px solid #e0b000; border-radius: 6px; padding: 4px 12px; }
#report textarea { font-family: ui-monospace, monospace; }
"""

# Settings worth showing (the rest: the model's defaults). The 7-step uniform_trailing eta-1 run breaks upstream's
# sampler on zero-SNR models (NaN at step 1); 36 uniform steps crash it on every model.
_EXAMPLES = [
    ("rocket.jpg", dict(prompt="a rocket lifting off, smoke billowing", steps=7, eta=1.0,
                        timestep_spacing="uniform_trailing"), True),
    ("coffee.jpg", dict(prompt="steam rising from a cup of coffee", steps=36, eta=1.0, timestep_spacing="uniform"),
     True),
    ("astronaut.jpg", dict(prompt="an astronaut waving at the camera"), False),
    ("chelsea.jpg", dict(prompt="a cat turning its head"), False),
]
# Keyframe pairs for the interpolation tab (drawn for dc_app, CC0: assets/LICENSES.md). The first row breaks
# upstream's sampler as the rocket does on the image-to-video tab.
_INTERP_EXAMPLES = [
    (("ball_up.png", "ball_down.png"), dict(prompt="a cartoon ball bouncing", steps=7, eta=1.0,
                                            timestep_spacing="uniform_trailing"), True),
    (("cat_sitting.png", "cat_standing.png"), dict(prompt="a cartoon cat standing up"), False),
    (("sun_low.png", "sun_high.png"), dict(prompt="the sun rising over hills"), False),
]
EXAMPLE_SEED = 123


class AppBlocks(gr.Blocks):
    """gr.Blocks whose refusals of a request's inputs speak dc_app's words.

    Gradio checks file payloads that carry its `meta` marker before any handler runs, and its refusal names
    the server path ("Cannot move /tmp/... to the gradio cache dir ..."). Here that refusal reads like dc_app's
    own upload check (dc_app.uploads), and anything else that breaks while Gradio reads the inputs gets a plain
    message; the details go to the log only.
    """

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except InvalidPathError:
            raise gr.Error(f"input file: {NOT_AN_UPLOAD}", print_exception=False) from None
        except Exception:
            log.warning("a request's inputs could not be read", exc_info=True)
            # E.g. a payload whose path is a URL Gradio will not fetch, or a payload of the wrong shape.
            raise gr.Error("the request's inputs could not be read: files must be uploaded to this app first "
                           "(gradio_client.handle_file does it); the other parameters are listed on this app's "
                           "API page", print_exception=False) from None


def _banner(service: Service) -> str:
    if service.is_test_model:
        return (f"**Test model.** `{service.model_name}` has seeded random weights: its videos are noise. It "
                f"exists so the app and its tests run on a CPU in seconds; start the app with `--model 512` for "
                f"real videos.")
    return ""


def _examples(service: Service, interp: bool) -> list[list]:
    """Example rows in the tab's input order: the image(s), every setting of the tab's endpoint, compare."""
    endpoint = "interpolate" if interp else "generate"
    rows = []
    for names, chosen, compare in (_INTERP_EXAMPLES if interp else _EXAMPLES):
        paths = [ASSETS_DIR / name for name in ((names,) if isinstance(names, str) else names)]
        if all(p.is_file() for p in paths):
            values = {f.name: f.default_for(service.defaults) for f in fields_of(endpoint)}
            values.update(chosen, seed=EXAMPLE_SEED)
            rows.append([str(p) for p in paths] + [values[f.name] for f in fields_of(endpoint)] + [compare])
    return rows


def _control(f: Field, service: Service, prefix: str) -> gr.components.Component:
    """The UI control of one setting, from its row in the settings table."""
    d = service.defaults
    elem_id, default = prefix + f.elem_id, f.default_for(d)
    if f.kind == "text":
        return gr.Textbox(label=f.label, placeholder=f.help, max_lines=3, elem_id=elem_id)
    if f.kind == "seed":
        return gr.Number(value=default, precision=0, minimum=-1, maximum=SEED_MAX, label=f.label, elem_id=elem_id)
    if f.kind == "choice":
        # Each choice with its one-line explanation; the value sent is the bare name.
        choices = [(f"{c}: {f.choice_help[c]}" if f.choice_help else c, c) for c in f.choices]
        return gr.Radio(choices, value=default, label=f.label, info=f.help, elem_id=elem_id)
    if f.kind == "flag":
        return gr.Checkbox(value=default, label=f.label, elem_id=elem_id)
    lo, hi = f.bounds_for(d)
    if lo == hi:  # one value only (frames on an interpolation model): nothing to choose, nothing to show
        return gr.Number(value=lo, visible=False, elem_id=elem_id)
    hi = min(hi, f.ui_max) if f.ui_max is not None else hi
    label = f"{f.label} ({FS_LABELS[d.fs_meaning]})" if f.name == "fs" else f.label
    return gr.Slider(lo, hi, value=min(default, hi), step=f.ui_step, label=label, elem_id=elem_id)


def _settings(service: Service, endpoint: str, prefix: str = "") -> dict:
    """The controls of an endpoint's settings (inside the current layout context), keyed by the settings' names,
    in the table's order: the main ones two to a row, the advanced ones in an accordion. `prefix` keeps element
    ids unique when a second tab has its own set."""
    c = {}
    main = [f for f in fields_of(endpoint) if not f.advanced]
    c[main[0].name] = _control(main[0], service, prefix)  # the prompt, full width
    for pair in (main[k:k + 2] for k in range(1, len(main), 2)):
        with gr.Row():
            for f in pair:
                c[f.name] = _control(f, service, prefix)
    c["random_seed"] = gr.Button("Random seed", size="sm", elem_id=f"{prefix}random-seed")
    if "frames" in c and c["frames"].visible:
        # What the chosen length costs, beside the slider (one window per T frames at stride T/4).
        c["frames_cost"] = gr.Markdown(frames_cost(service)(c["frames"].value), elem_id=f"{prefix}frames-cost")
        c["frames"].change(frames_cost(service), inputs=c["frames"], outputs=c["frames_cost"], queue=False,
                           api_visibility="private", show_progress="hidden")
    with gr.Accordion("Advanced", open=False):
        for f in fields_of(endpoint):
            if f.advanced:
                c[f.name] = _control(f, service, prefix)
    return c


def _follow_schedule(service: Service, c: dict, plot, plot_note) -> None:
    """The plot and its note follow every change of steps, eta, spacing and sampler: dragging, typing, example rows.

    `.change` fires for programmatic updates too (an example row), which `.release` never does; typing a
    number fires it on every keystroke, which the plot (pure arithmetic, no model run) keeps up with.
    """
    schedule_inputs = [c["steps"], c["eta"], c["timestep_spacing"], c["sampler"]]
    gr.on([c[name].change for name in ("steps", "eta", "timestep_spacing", "sampler")], ui_schedule(service),
          inputs=schedule_inputs, outputs=[plot, plot_note], queue=False, api_visibility="private",
          show_progress="hidden")


def _tab(service: Service, rule, interp: bool) -> gr.Blocks:
    """One tab: its image input(s), the settings, compare, Generate/Cancel, the two video panes, the report, the
    seed, the settings file and the schedule plot. The interpolation tab's element ids start with "interp-"."""
    prefix, endpoint = ("interp-", "interpolate") if interp else ("", "generate")
    with gr.Row():
        with gr.Column():
            if interp:
                gr.Markdown("Two images: a video from the first to the second. Leave the second empty for a loop "
                            "that returns to the first.")
                with gr.Row():
                    images = [gr.Image(label="First frame", type="filepath", image_mode=None,
                                       elem_id="interp-image"),
                              gr.Image(label="Last frame (empty: loop)", type="filepath", image_mode=None,
                                       elem_id="interp-image2")]
            else:
                images = [gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], image_mode=None,
                                   elem_id="image")]
            s = _settings(service, endpoint, prefix=prefix)
            compare = gr.Checkbox(label="Compare: upstream's stock sampler beside the chosen one, same noise",
                                  elem_id=f"{prefix}compare")
            with gr.Row():
                run_btn = gr.Button("Interpolate" if interp else "Generate", variant="primary",
                                    elem_id="interpolate" if interp else "generate")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}cancel")
            # Will it fit: the estimate against the device's free memory, for the settings on the page.
            s["memory"] = gr.Markdown(elem_id=f"{prefix}memory")
            s["memory_inputs"] = [s[name] for name in memory_fields(endpoint)]
            gr.on([c.change for c in s["memory_inputs"]], ui_memory(service, endpoint), inputs=s["memory_inputs"],
                  outputs=s["memory"], queue=False, api_visibility="private", show_progress="hidden")
        with gr.Column():
            with gr.Row():
                with gr.Column(visible=False, min_width=160) as stock_column:
                    stock_video = gr.Video(label="stock sampler", autoplay=True, loop=True, buttons=["download"],
                                           interactive=False, elem_id=f"{prefix}stock-video")
                    stock_note = gr.Markdown(elem_id=f"{prefix}stock-note")
                with gr.Column(min_width=160):
                    video = gr.Video(label="result", autoplay=True, loop=True, buttons=["download"],
                                     interactive=False, elem_id=f"{prefix}video")
                    video_note = gr.Markdown(elem_id=f"{prefix}video-note")
            report = gr.Textbox(label="Report", lines=4, interactive=False, elem_id=f"{prefix}report")
            with gr.Row():
                # A textbox, not a Number: a Number shows 0 before any run, which reads like a seed.
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id=f"{prefix}seed-used")
                settings_file = gr.File(label="Settings (JSON)", interactive=False, elem_id=f"{prefix}settings")
            plot = gr.LinePlot(x="step", y="value", color="curve", height=300, elem_id=f"{prefix}schedule-plot",
                               color_map=PLOT_COLOURS, caption=PLOT_CAPTION,
                               label="DDIM schedule: sigma and the square-root argument per step",
                               x_title="step (1 = noisiest)", y_title="value")
            plot_note = gr.Markdown(elem_id=f"{prefix}schedule-note")
    outputs = [stock_column, stock_video, stock_note, video, video_note, report, seed_used, settings_file]
    if interp:
        _storyboard(service, rule, s, outputs)
    else:
        _extend(service, rule, s, outputs)
    inputs = images + [s[f.name] for f in fields_of(endpoint)] + [compare]
    examples = _examples(service, interp)
    if examples:
        gr.Examples(examples, inputs=inputs, label="Examples (compare on: settings that break the stock sampler)")

    run_event = run_btn.click(
        ui_run(service, rule, interp=interp), inputs=inputs,
        outputs=[stock_column, stock_video, stock_note, video, video_note, report, seed_used, settings_file],
        concurrency_id=CONCURRENCY_ID, api_visibility="private", preprocess=False,
        show_progress_on=[stock_video, video],  # the bar belongs on the videos, not on the small boxes
    )
    # Cancelling the event makes the running handler tell the sampler to stop (dc_app.ui_handlers).
    cancel_btn.click(lambda: "cancelled", outputs=report, cancels=[run_event], queue=False, api_visibility="private")
    s["random_seed"].click(random_seed, outputs=s["seed"], queue=False, api_visibility="private")
    compare.change(lambda on: gr.update(visible=on), inputs=compare, outputs=stock_column, queue=False,
                   api_visibility="private")
    _follow_schedule(service, s, plot, plot_note)
    return s, plot, plot_note


def _storyboard(service: Service, rule, s: dict, outputs: list) -> None:
    """The interpolation tab's storyboard: several keyframes in order (removable, reorderable by number), one
    video through each consecutive pair, with the tab's settings; the result lands in the tab's video pane."""
    with gr.Accordion("Storyboard: several keyframes", open=False):
        gr.Markdown("Upload 2 to 9 keyframes; the video runs through them in order, each keyframe once. Remove one "
                    "with its x; reorder them by typing their numbers.")
        files = gr.File(file_count="multiple", file_types=["image"], label="Keyframes, in upload order",
                        elem_id="storyboard-keyframes")
        with gr.Row():
            order = gr.Textbox(label="Order (optional)", placeholder="e.g. 3 1 2", elem_id="storyboard-order")
            loop = gr.Checkbox(label="Loop back to the first keyframe", elem_id="storyboard-loop")
        prompts = gr.Textbox(label="Prompts (optional): one line per segment, else the prompt above for all",
                             lines=3, elem_id="storyboard-prompts")
        button = gr.Button("Make storyboard", variant="primary", elem_id="storyboard")
    button.click(ui_storyboard(service, rule), inputs=[files, order, prompts, loop] +
                 [s[f.name] for f in fields_of("storyboard")], outputs=outputs, concurrency_id=CONCURRENCY_ID,
                 api_visibility="private", preprocess=False, show_progress_on=[outputs[3]])


def _extend(service: Service, rule, s: dict, outputs: list) -> None:
    """The image-to-video tab's Extend: continue an uploaded video from its last frame with the tab's settings
    (Frames: how many more); the joined video lands in the tab's video pane."""
    with gr.Accordion("Extend a video", open=False):
        gr.Markdown("Upload a video (at most 50 MB and 120 s): its last frame starts a new clip of *Frames* frames, "
                    "joined after it. The motion may change at the join, and colours drift a little with each "
                    "extension.")
        upload = gr.Video(label="Video to continue", sources=["upload"], elem_id="extend-video")
        button = gr.Button("Extend", variant="primary", elem_id="extend")
    button.click(ui_extend(service, rule), inputs=[upload] + [s[f.name] for f in fields_of("extend")],
                 outputs=outputs, concurrency_id=CONCURRENCY_ID, api_visibility="private", preprocess=False,
                 show_progress_on=[outputs[3]])


def build_demo(service: Service) -> gr.Blocks:
    """The page for `service`'s model, with the named API endpoints /generate, /compare (and /interpolate).

    Interpolation models (512_interp, ToonCrafter) open on their interpolation tab."""
    h, w = service.frame_size
    rule = upload_rule(service)
    with AppBlocks(title="DynamiCrafter image to video", delete_cache=DELETE_CACHE) as demo:
        if service.is_test_model:
            gr.Markdown(_banner(service), elem_id="test-model-banner")
        status_text = model_banner(*service.model_status)
        model_status = gr.Markdown(status_text, visible=bool(status_text), elem_id="model-status")
        status_timer = gr.Timer(STATUS_REFRESH_S, active=service.model_status[0] == "loading")
        gr.Markdown(
            f"# DynamiCrafter: image to video\nModel **{service.model_name}**: {service.frames} frames of "
            f"{w}x{h} at {service.fps} fps. Every sampler but stock never gives NaN; switch **Compare** on to "
            f"see upstream's (stock) sampler on the same noise."
        )
        tabs = [(True, "Interpolation / loop")] if service.is_interp_model else []
        tabs.append((False, "Image to video"))
        drawn = {}
        for interp, title in tabs:
            with gr.Tab(title):
                drawn[interp] = _tab(service, rule, interp)
        # While the model loads: the banner says what happens, every STATUS_REFRESH_S; the first tab's plot
        # follows once it is ready.
        s, plot, plot_note = drawn[tabs[0][0]]
        gr.on([demo.load, status_timer.tick], ui_model_status(service),
              inputs=[s["steps"], s["eta"], s["timestep_spacing"], s["sampler"]],
              outputs=[model_status, status_timer, plot, plot_note], queue=False, api_visibility="private",
              show_progress="hidden")
        for interp, (c, _, _) in drawn.items():  # the memory lines: at load, and once the model is there
            gr.on([demo.load, status_timer.tick], ui_memory(service, "interpolate" if interp else "generate"),
                  inputs=c["memory_inputs"], outputs=c["memory"], queue=False, api_visibility="private",
                  show_progress="hidden")

        for name, fn in api_functions(service, rule).items():
            gr.api(fn, api_name=name, concurrency_id=CONCURRENCY_ID)
    return demo
