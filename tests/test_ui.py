"""dc_app.ui / dc_app.ui_handlers without a server: the page's controls, the endpoints per model, cancellation
and the ZeroGPU wrapper."""
from __future__ import annotations

import asyncio
import inspect
import pickle
import sys
import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from dc_app.service import Service
from dc_app.settings import fields_of
from dc_app.ui import UI_MAX_STEPS, build_demo
from dc_app.ui_handlers import on_device, run_cancellable, ui_schedule
from dc_app.validation import InputError
from test_service import stub_model

LATENT = {"256": (32, 32), "512": (40, 64), "1024": (72, 128), "512_interp": (40, 64), "tiny": (8, 8)}


def service_for(name, tmp_path) -> Service:
    return Service(stub_model(name, latent=LATENT[name]), output_dir=tmp_path)


def by_id(demo: gr.Blocks) -> dict:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


@pytest.mark.parametrize("name", ["256", "512_interp", "tiny"])
def test_endpoints_per_model(tmp_path, name):
    svc = service_for(name, tmp_path)
    info = build_demo(svc).get_api_info()
    expected = {"/generate", "/compare"} | ({"/interpolate", "/storyboard"} if name == "512_interp" else {"/extend"})
    assert set(info["named_endpoints"]) == expected and info["unnamed_endpoints"] == {}
    for endpoint, spec in info["named_endpoints"].items():
        method = getattr(Service, endpoint[1:])
        images = [p.name for p in inspect.signature(method).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
        if endpoint == "/compare" and not svc.is_interp_model:
            images.remove("image2")  # only interpolation models compare between two images
        names = images + [f.name for f in fields_of(endpoint[1:])]
        assert [p["parameter_name"] for p in spec["parameters"]] == names
        defaults = {p["parameter_name"]: p["parameter_default"] for p in spec["parameters"]}
        d = svc.defaults
        assert (defaults["fs"], defaults["timestep_spacing"], defaults["guidance_rescale"]) == (
            d.fs, d.timestep_spacing, d.guidance_rescale)


@pytest.mark.parametrize("name", ["256", "1024", "tiny"])
def test_controls_follow_the_model(tmp_path, name):
    svc = service_for(name, tmp_path)
    blocks = by_id(build_demo(svc))
    d = svc.defaults
    for elem in ("image", "prompt", "seed", "random-seed", "guidance-rescale", "spacing", "sampler", "perframe",
                 "compare", "generate", "cancel", "video", "stock-video", "report", "seed-used", "settings",
                 "schedule-plot"):
        assert elem in blocks, elem
    steps, fs = blocks["steps"], blocks["fs"]
    assert (steps.minimum, steps.maximum, steps.value) == (1, UI_MAX_STEPS, d.ddim_steps)
    assert (fs.minimum, fs.maximum, fs.value) == (*d.fs_range, d.fs)
    assert (blocks["eta"].value, blocks["cfg"].value) == (d.ddim_eta, d.cfg_scale)
    assert blocks["spacing"].value == d.timestep_spacing and blocks["sampler"].value == "fixed"
    assert blocks["video"].autoplay and blocks["video"].loop and blocks["stock-video"].loop
    assert ("test-model-banner" in blocks) == (name == "tiny")
    assert "interp-image" not in blocks


def test_interpolation_tab_only_for_the_interp_model(tmp_path):
    demo = build_demo(service_for("512_interp", tmp_path))
    blocks = by_id(demo)
    assert "interp-image" in blocks and "interp-image2" in blocks and "interp-steps" in blocks
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids))  # the second tab's controls do not reuse the first tab's ids


def test_schedule_plot_data(tmp_path):
    from dc_app import load_pretrained

    svc = Service(load_pretrained("tiny", device="cpu"), output_dir=tmp_path)
    plot = ui_schedule(svc)
    table, note = plot(7, 1.0, "uniform_trailing")
    assert set(table["curve"]) == {"stock sigma", "stock 1 - a_prev - sigma^2", "fixed sigma",
                                   "fixed 1 - a_prev - sigma^2"}
    assert len(table) == 4 * 7
    assert note.startswith("stock: 1 - a_prev - sigma^2 = -5.96e-08 < 0 at step 1 (t=999)")
    table, note = plot(36, 1.0, "uniform")
    assert set(table["curve"]) == {"fixed sigma", "fixed 1 - a_prev - sigma^2"}
    assert note.startswith("stock: crashes before the first step: uniform spacing cannot do 36 steps")
    table, note = plot(50, 1.0, "uniform_trailing")
    assert note.startswith("stock: every step is finite")
    assert plot(0, 1.0, "uniform") == (None, "steps: expected a whole number from 1 to 1000, got 0")


# --------------------------------------------------------------------------------------- cancellation


def test_cancelling_the_event_stops_the_run():
    started, stopped = threading.Event(), threading.Event()

    def run(cancel):
        started.set()
        if cancel.wait(10):
            stopped.set()
        return "finished"

    async def scenario():
        task = asyncio.create_task(run_cancellable(run))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()  # what Gradio does for the Cancel button and for gradio_client's job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert stopped.wait(5)


def test_errors_become_plain_messages():
    def refuse(cancel):
        raise InputError("steps: expected a whole number from 1 to 1000, got 0")

    def crash(cancel):
        raise KeyError("/secret/path")

    with pytest.raises(gr.Error) as err:
        asyncio.run(run_cancellable(refuse))
    assert err.value.message == "steps: expected a whole number from 1 to 1000, got 0"
    with pytest.raises(gr.Error) as err:
        asyncio.run(run_cancellable(crash))
    assert err.value.message.startswith("internal error (KeyError)") and "secret" not in err.value.message


# ------------------------------------------------------------------------------------------ ZeroGPU


def test_zerogpu_wrapper_sends_only_plain_values(tmp_path, monkeypatch):
    calls = []

    def GPU(duration):
        def decorate(fn):
            def run(*args):
                pickle.dumps(args)  # ZeroGPU hands the call to another process
                calls.append(duration(*args))
                return fn(*args)
            return run
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", SimpleNamespace(GPU=GPU))
    svc = service_for("tiny", tmp_path)
    seen = {}
    svc.compare = lambda **kwargs: seen.update(kwargs) or ("stock.mp4", "fixed.mp4", "report")
    call = on_device(svc, "compare", runs=2)
    result = call(cancel=threading.Event(), progress=lambda *a: None, image="in.png", steps=100)
    assert result == ("stock.mp4", "fixed.mp4", "report")
    assert seen == {"image": "in.png", "steps": 100}
    assert calls == [svc.gpu_seconds(100, 2)] and calls[0] > svc.gpu_seconds(100, 1)


def test_without_spaces_the_service_is_called_directly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    svc = service_for("tiny", tmp_path)
    assert on_device(svc, "generate") == svc.generate


def test_interpolation_models_open_on_their_interpolation_tab(tmp_path):
    tabs = [b.label for b in build_demo(service_for("512_interp", tmp_path)).blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Interpolation / loop", "Image to video"]
    tabs = [b.label for b in build_demo(service_for("tiny", tmp_path)).blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Image to video"]


def test_storyboard_order_picks_and_reorders_the_uploads():
    from dc_app.ui_handlers import _ordered
    from dc_app.validation import InputError

    paths = ["a.png", "b.png", "c.png"]
    assert _ordered(paths, "") == paths and _ordered(paths, None) == paths
    assert _ordered(paths, "3 1") == ["c.png", "a.png"] and _ordered(paths, "2,3, 1") == ["b.png", "c.png", "a.png"]
    for bad in ("4", "1 1", "0", "x", 3):
        with pytest.raises(InputError, match="^order: expected"):
            _ordered(paths, bad)
