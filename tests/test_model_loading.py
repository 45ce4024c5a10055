"""Issue 4: the model loads at start-up, in the background; the page and every request say what is happening
(downloading with GB so far, reading the weights, ready, or the load error) until it is ready."""
from __future__ import annotations

import threading
import time

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file

from apphelpers import READY_LINE, REPO, call_raw, start_app, stop_app, upload
from dc_app.loading.checkpoints import CheckpointError, download_progress
from dc_app.faults import parse_fault
from dc_app.loading import load_pretrained
from dc_app.loading.background import ModelLoader, ModelNotReady
from dc_app.service import Service
from dc_app.ui_handlers import ui_model_status

from conftest import video_api

IMAGE = REPO / "assets" / "rocket.jpg"
READING = "loading the tiny model (reading the weights)"


class Gate:
    """A load function that blocks until `open()`; then returns `result` or raises it."""

    def __init__(self, result):
        self.result, self.calls, self._open = result, 0, threading.Event()

    def __call__(self):
        self.calls += 1
        assert self._open.wait(30)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def open(self):
        self._open.set()


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("tiny", device="cpu")


def test_loader_reports_loading_then_ready(tiny, tmp_path):
    gate = Gate(tiny)
    loader = ModelLoader("tiny", gate).start()
    assert loader.state == "loading" and not loader.ready and loader.status == READING
    with pytest.raises(ModelNotReady) as err:
        loader.model
    assert str(err.value) == f"The model is still loading: {READING}. Please try again in a moment."
    assert not loader.wait(0.05)
    gate.open()
    assert loader.wait(30)
    assert loader.state == "ready" and loader.status == "ready" and loader.model is tiny and gate.calls == 1


def test_service_facts_come_from_the_config_before_the_weights(tiny, tmp_path):
    gate = Gate(tiny)
    pending = Service(ModelLoader("tiny", gate).start(), output_dir=tmp_path / "a")
    loaded = Service(tiny, output_dir=tmp_path / "b")
    for fact in ("model_name", "frame_size", "frames", "fps", "defaults", "is_test_model", "is_interp_model"):
        assert getattr(pending, fact) == getattr(loaded, fact), fact
    assert pending.model_status == ("loading", READING) and loaded.model_status == ("ready", "ready")
    with pytest.raises(ModelNotReady, match="^The model is still loading: loading the tiny model"):
        pending.generate(str(IMAGE), steps=1, seed=1)
    assert list((tmp_path / "a").rglob("*.mp4")) == []
    gate.open()
    pending._source.wait(30)
    video, report, seed = video_api(pending.generate(str(IMAGE), steps=1, seed=1))
    assert report.startswith("fixed: finite") and seed == 1 and video.endswith(".mp4")


@pytest.mark.parametrize("error, expected", [
    (CheckpointError("Doubiiu/x/model.ckpt is not in the Hugging Face cache; connect to the internet"),
     "the tiny model could not be loaded: Doubiiu/x/model.ckpt is not in the Hugging Face cache; connect to the "
     "internet"),
    (KeyError("/secret/path"), "the tiny model could not be loaded: KeyError; the server log has the details"),
])
def test_a_failed_load_is_reported_to_every_request(tmp_path, error, expected):
    gate = Gate(error)
    gate.open()
    loader = ModelLoader("tiny", gate).start()
    assert loader.wait(30) and loader.state == "failed" and loader.status == expected
    svc = Service(loader, output_dir=tmp_path)
    for _ in range(2):
        with pytest.raises(ModelNotReady) as err:
            svc.compare(str(IMAGE), steps=1)
        assert str(err.value) == f"{expected}. The app cannot generate until it is restarted."


def test_load_now_raises_the_error():
    gate = Gate(CheckpointError("gone"))
    gate.open()
    with pytest.raises(RuntimeError, match="the tiny model could not be loaded: gone"):
        ModelLoader("tiny", gate).load_now()


def test_fault_settings_delay_and_fail_the_load(tiny):
    plan = parse_fault("load-delay@0.5,raise@step2")
    assert (plan.load_delay, plan.load_error, [str(f) for f in plan.armed]) == (0.5, False, ["raise@step2"])
    started = time.perf_counter()
    loader = ModelLoader("tiny", lambda: tiny, delay=plan.load_delay).start()
    assert loader.state == "loading"
    assert loader.wait(30) and loader.ready and time.perf_counter() - started >= 0.5
    plan = parse_fault("load-error")
    assert plan.load_error and plan.load_delay == 0.0 and plan.armed == []
    failing = ModelLoader("tiny", lambda: tiny, fail=plan.load_error).start()
    assert failing.wait(30) and failing.status == "the tiny model could not be loaded: injected by " \
                                                  "DC_APP_FAULT=load-error"
    for bad in ("load-delay@", "load-delay@x", "load-error@1", "load@step1"):
        with pytest.raises(ValueError, match="load-delay@SECONDS, load-error or free-memory@MIB"):
            parse_fault(bad)


def test_download_progress_from_the_cache(tmp_path, monkeypatch):
    blobs = tmp_path / "hub" / "models--Doubiiu--DynamiCrafter_512" / "blobs"
    blobs.mkdir(parents=True)
    assert download_progress("Doubiiu/DynamiCrafter_512", tmp_path / "hub") is None
    (blobs / "0123abcd").write_bytes(b"x" * 10)  # a finished blob is no download
    assert download_progress("Doubiiu/DynamiCrafter_512", tmp_path / "hub") is None
    with open(blobs / "4567ef.incomplete", "wb") as f:
        f.truncate(3_240_000_000)  # sparse: takes no disk
    assert download_progress("Doubiiu/DynamiCrafter_512", tmp_path / "hub") == 3_240_000_000
    assert download_progress("Doubiiu/DynamiCrafter_1024", tmp_path / "hub") is None

    monkeypatch.setenv("DC_APP_CHECKPOINTS", str(tmp_path / "none"))  # no local checkpoint: it downloads
    gate = Gate(None)
    loader = ModelLoader("512", gate, hf_cache=tmp_path / "hub").start()
    assert loader.status == "downloading model.ckpt from Doubiiu/DynamiCrafter_512: 3.2 GB so far"
    (blobs / "4567ef.incomplete").rename(blobs / "4567ef")  # what huggingface_hub does when it is done
    assert loader.status == "loading the 512 model (reading the weights)"
    gate.open()


def test_the_page_shows_the_status_until_ready(tiny, tmp_path):
    gate = Gate(tiny)
    loader = ModelLoader("tiny", gate).start()
    tick = ui_model_status(Service(loader, output_dir=tmp_path))
    banner, timer, table, note = tick(7, 1.0, "uniform_trailing")
    assert banner["visible"] is True and banner["value"].startswith(f"**The model is still loading:** {READING}")
    assert isinstance(timer, gr.Timer) and timer.active is True
    assert table is None and note == f"The schedule plot appears once the model is loaded ({READING})."
    gate.open()
    loader.wait(30)
    banner, timer, table, note = tick(7, 1.0, "uniform_trailing")
    assert banner["visible"] is False and timer.active is False
    assert len(table) == 4 * 7 and note.startswith("stock: 1 - a_prev - sigma^2")

    failed = ModelLoader("tiny", lambda: tiny, fail=True).start()
    failed.wait(30)
    banner, timer, table, note = ui_model_status(Service(failed, output_dir=tmp_path))(7, 1.0, "uniform")
    assert banner["visible"] is True and timer.active is False and table is None
    assert banner["value"].startswith("**The model could not be loaded:** the tiny model could not be loaded: "
                                      "injected by DC_APP_FAULT=load-error")


# ------------------------------------------------------------------------------------- the running app


def _page_status(app) -> dict:
    config = httpx.get(app.url + "config", timeout=10).json()
    return next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model-status")


@pytest.mark.slow
def test_app_serves_while_loading_then_generates(tmp_path):
    app = start_app(tmp_path, {"DC_APP_FAULT": "load-delay@25"}, wait_for_model=False)
    try:
        assert READY_LINE not in app.log()
        status = _page_status(app)
        assert status["visible"] is True and f"**The model is still loading:** {READING}" in status["value"]
        kind, message = call_raw(app, "generate", {"image": upload(app, IMAGE), "steps": 1}, timeout=60)
        assert kind == "error" and f"The model is still loading: {READING}" in str(message), message
        deadline = time.monotonic() + 120
        while READY_LINE not in app.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert READY_LINE in app.log()
        video, report, seed = Client(app.url, verbose=False).predict(handle_file(str(IMAGE)), steps=1, seed=3,
                                                                     api_name="/generate")
        assert report.startswith("fixed: finite") and seed == 3 and app.result_files() != []
    finally:
        stop_app(app)


@pytest.mark.slow
def test_app_reports_a_load_error_and_keeps_serving(tmp_path):
    app = start_app(tmp_path, {"DC_APP_FAULT": "load-error"}, wait_for_model=False)
    try:
        deadline = time.monotonic() + 60
        while "could not be loaded" not in app.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        expected = "the tiny model could not be loaded: injected by DC_APP_FAULT=load-error"
        assert "**The model could not be loaded:** " + expected in _page_status(app)["value"]
        for endpoint in ("generate", "compare"):
            kind, message = call_raw(app, endpoint, {"image": upload(app, IMAGE), "steps": 1}, timeout=60)
            assert kind == "error" and expected in str(message), message
        assert app.alive()
    finally:
        stop_app(app)


def test_an_8bit_kind_the_device_lacks_is_explained_on_the_page():
    from dc_app.models.weight_storage import WeightStorageUnsupported

    def load():
        raise WeightStorageUnsupported("fp8 weight storage: device cuda:0 cannot convert float8_e4m3fn (no kernel); "
                                       "use int8 weight storage (--weights-dtype int8) instead")

    loader = ModelLoader("tiny", load).start()
    assert loader.wait(30) and loader.state == "failed"
    assert loader.status == ("the tiny model could not be loaded: fp8 weight storage: device cuda:0 cannot convert "
                             "float8_e4m3fn (no kernel); use int8 weight storage (--weights-dtype int8) instead")
