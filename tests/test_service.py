"""dc_app.service: validation, input mapping, defaults per model, report wording, failures that leave nothing.

Most tests replace the pipeline with a recorder (`FakePipeline`) so they check the service's own logic in
milliseconds; the tests marked `tiny` run the real tiny model end to end.
"""
from __future__ import annotations

import json
from dataclasses import replace
import math
import threading
import time
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from dc_app import service as service_mod
from dc_app.loading.spec import CONFIG_DIR, load_model_config, model_spec
from dc_app.faults import parse_fault
from dc_app.pipeline import SynthesisResult
from dc_app.schedule import ddim_timesteps, repair_timesteps
from dc_app.step_grids import grid_timesteps
from dc_app.settings import fields_of
from dc_app.result import FINITE, SamplerOutcome, run_note
from dc_app.stock_failure import StockIndexError
from dc_app.service import Cancelled, OutOfMemory, PeakMemory, RunFailed, Service
from dc_app.storage import MIN_KEEP_S, OutputStore
from dc_app.validation import InputError

from conftest import compare_api, video_api


def stub_model(name: str = "tiny", frames: int | None = None, latent=(8, 8)):
    """What the service reads from a model, built from the real config (no weights)."""
    cfg = load_model_config(name)
    return SimpleNamespace(
        config=cfg, image_size=latent,
        temporal_length=frames or int(cfg.model.params.unet_config.params.temporal_length),
        channels=4, device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32,
        offloaded=frozenset(), num_timesteps=1000,
        # What the memory estimate reads: plain weights, no chunking, nothing held (it then estimates the config).
        model=SimpleNamespace(diffusion_model=torch.nn.Identity()), ff_chunking=None,
        parameters=lambda: iter(()), buffers=lambda: iter(()),
        cond_stage_model=SimpleNamespace(num_tokens=lambda text: len(text.split()) + 2, context_length=77),
    )


class FakePipeline:
    """Stands in for run_synthesis: records its arguments, calls the callback per step, returns a video drawn
    from the generator (so the seed decides it), NaN or an exception on request."""

    def __init__(self):
        self.calls = []
        self.nan_from = {}     # sampler -> 0-based step from which the video is NaN
        self.raise_for = {}    # sampler -> exception

    def __call__(self, model, sampler, prompts, videos, noise_shape, n_samples=1, ddim_steps=50, ddim_eta=1.0,
                 unconditional_guidance_scale=1.0, fs=None, timestep_spacing="uniform", guidance_rescale=0.0,
                 interp=False, loop=False, *, generator=None, callback=None, decode_chunk_size=None, **kw):
        self.calls.append(dict(sampler=sampler, prompts=prompts, videos=videos, noise_shape=list(noise_shape),
                               ddim_steps=ddim_steps, ddim_eta=ddim_eta, cfg=unconditional_guidance_scale, fs=fs,
                               spacing=timestep_spacing, guidance_rescale=guidance_rescale, interp=interp,
                               loop=loop, decode_chunk_size=decode_chunk_size, generator=generator, **kw))
        if sampler in self.raise_for:
            raise self.raise_for[sampler]
        if timestep_spacing == "logsnr":  # dc_app's own grid (tiny's schedule: zero-SNR, 512's betas)
            timesteps = [int(t) for t in grid_timesteps("logsnr", ddim_steps, 0.00085, 0.012, zero_snr=True)]
        else:
            timesteps = ddim_timesteps(timestep_spacing, ddim_steps)
            timesteps = [int(t) for t in (repair_timesteps(timesteps) if sampler != "stock" else timesteps)]
        for i in range(len(timesteps)):
            if callback is not None:
                callback(i, len(timesteps), None, None)
        _, _, t, h, w = noise_shape
        video = torch.rand(1, 1, 3, t, 8 * h, 8 * w, generator=generator) * 2 - 1
        nonfinite = None
        if sampler in self.nan_from:
            step = self.nan_from[sampler]
            video[:] = math.nan
            nonfinite = {"step": step, "index": len(timesteps) - 1 - step,
                         "timestep": timesteps[len(timesteps) - 1 - step], "stage": "x_prev"}
        return SynthesisResult(videos=video, nonfinite=nonfinite, ddim_timesteps=timesteps)


@pytest.fixture
def fake(monkeypatch):
    pipeline = FakePipeline()
    monkeypatch.setattr(service_mod, "run_synthesis", pipeline)
    return pipeline


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (120, 80), (200, 30, 30)).save(path)
    return str(path)


def results(svc: Service) -> list[str]:
    return sorted(p.name for p in svc.store.dir.iterdir())


# ------------------------------------------------------------------------------------ defaults per model


@pytest.mark.parametrize("name, spacing, rescale, fs, fs_range, size", [
    ("256", "uniform", 0.0, 3, (1, 6), (256, 256)),
    ("512", "uniform_trailing", 0.7, 24, (15, 30), (320, 512)),
    ("1024", "uniform_trailing", 0.7, 10, (5, 15), (576, 1024)),
    ("512_interp", "uniform_trailing", 0.7, 5, (5, 30), (320, 512)),
    ("tiny", "uniform_trailing", 0.7, 24, (15, 30), (64, 64)),
])
def test_defaults_per_model(tmp_path, name, spacing, rescale, fs, fs_range, size):
    cfg = load_model_config(name)
    latent = tuple(int(s) for s in cfg.model.params.image_size)
    svc = Service(stub_model(name, latent=latent), output_dir=tmp_path)
    req = svc.settings_for({})
    assert (req.timestep_spacing, req.guidance_rescale, req.fs) == (spacing, rescale, fs)
    assert (req.steps, req.eta, req.cfg_scale, req.seed) == (50, 1.0, 7.5, -1)
    assert svc.frame_size == size
    assert svc.is_interp_model == (name == "512_interp") and svc.is_test_model == (name == "tiny")
    lo, hi = fs_range
    valid = dict(prompt="", steps=1, eta=0, cfg_scale=1, seed=0, guidance_rescale=0, timestep_spacing=spacing,
                 perframe_ae=True)
    assert svc.settings_for({**valid, "fs": lo}).fs == lo
    for bad in (lo - 1, hi + 1):
        with pytest.raises(InputError, match=rf"^fs: expected a whole number from {lo} to {hi}, got {bad}$"):
            svc.settings_for({**valid, "fs": bad})


def test_api_signature_matches_service_and_model_defaults(tmp_path):
    import inspect

    from dc_app.ui_handlers import api_functions

    svc = Service(stub_model("256", latent=(32, 32)), output_dir=tmp_path)
    api = api_functions(svc)
    assert set(api) == {"generate", "compare", "extend"}  # /interpolate and /storyboard: interpolation models
    for name, fn in api.items():
        api_params = inspect.signature(fn).parameters
        # The service takes the images positionally and the settings of the table by name.
        images = [p.name for p in inspect.signature(getattr(svc, name)).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD]
        if name == "compare" and not svc.is_interp_model:
            images.remove("image2")  # only interpolation models compare between two images
        assert list(api_params) == images + [f.name for f in fields_of(name)]
        assert [n for n, p in api_params.items() if p.default is inspect.Parameter.empty] == images[:1]
    gen = inspect.signature(api["generate"]).parameters
    assert (gen["timestep_spacing"].default, gen["fs"].default, gen["guidance_rescale"].default) == ("uniform", 3, 0.0)
    interp = Service(stub_model("512_interp", latent=(40, 64)), output_dir=tmp_path)
    assert "interpolate" in api_functions(interp)


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps: expected a whole number from 1 to 1000, got 0"),
    ("steps", 1001, "steps: expected a whole number from 1 to 1000, got 1001"),
    ("steps", 7.5, "steps: expected a whole number from 1 to 1000, got 7.5"),
    ("steps", "50", "steps: expected a whole number from 1 to 1000, got '50' (text)"),
    ("steps", True, "steps: expected a whole number from 1 to 1000, got True (true/false)"),
    ("eta", -0.1, "eta: expected a number from 0 to 1, got -0.1"),
    ("eta", math.nan, "eta: expected a number from 0 to 1, got NaN"),
    ("cfg_scale", math.inf, "cfg_scale: expected a number from 1 to 15, got Infinity"),
    ("cfg_scale", 0.5, "cfg_scale: expected a number from 1 to 15, got 0.5"),
    ("guidance_rescale", 1.5, "guidance_rescale: expected a number from 0 to 1, got 1.5"),
    ("seed", -2, "seed: expected -1 (random) or a whole number from 0 to 4294967295, got -2"),
    ("seed", 2**32, "seed: expected -1 (random) or a whole number from 0 to 4294967295, got 4294967296"),
    ("timestep_spacing", "linear", "timestep_spacing: expected one of uniform, uniform_trailing, logsnr, got 'linear' (text)"),
    ("perframe_ae", "yes", "perframe_ae: expected true or false, got 'yes' (text)"),
    ("prompt", 42, "prompt: expected text of at most 4000 characters, got 42"),
    ("prompt", "x" * 4001, "prompt: expected text of at most 4000 characters, got 4001"),
])
def test_every_field_is_checked_with_its_range(tmp_path, field, value, message):
    svc = Service(stub_model(), output_dir=tmp_path)
    args = dict(prompt="", steps=None, eta=None, cfg_scale=None, fs=None, seed=None, guidance_rescale=None,
                timestep_spacing=None, perframe_ae=None)
    args[field] = value
    with pytest.raises(InputError) as err:
        svc.settings_for(args)
    assert str(err.value) == message


def test_unknown_sampler_is_refused_before_any_work(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    with pytest.raises(InputError, match="^sampler: expected one of fixed, stock, dpmpp_2m, dpmpp_2m_sde, unipc, got 'ddpm'"):
        svc.generate(image, sampler="ddpm")
    assert fake.calls == []


def test_prompt_is_cleaned_and_long_prompts_get_a_notice(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    _, report, _ = video_api(svc.generate(image, prompt="a\x00 cat\u202e\n  jumps\u200b", steps=1, seed=1))
    assert fake.calls[-1]["prompts"] == ["a cat jumps"]
    assert "prompt: control or invisible characters were removed" in report
    _, report, _ = video_api(svc.generate(image, prompt="word " * 80, steps=1, seed=1))
    assert "prompt: 82 tokens is longer than the text encoder's 77; the end was cut off" in report
    _, report, _ = video_api(svc.generate(image, prompt="", steps=1, seed=1))
    assert fake.calls[-1]["prompts"] == [""] and "prompt" not in report


# -------------------------------------------------------------------------------------- input mapping


def test_generate_maps_every_argument(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    video, report, seed = video_api(svc.generate(image, prompt="a dog", steps=12, eta=0.25, cfg_scale=3.5, fs=17,
                                       seed=99, guidance_rescale=0.3, timestep_spacing="uniform",
                                       sampler="stock", perframe_ae=False))
    call = fake.calls[-1]
    assert (call["sampler"], call["prompts"], call["ddim_steps"], call["ddim_eta"], call["cfg"], call["fs"],
            call["spacing"], call["guidance_rescale"]) == ("stock", ["a dog"], 12, 0.25, 3.5, 17, "uniform", 0.3)
    assert call["noise_shape"] == [1, 4, 4, 8, 8] and (call["interp"], call["loop"]) == (False, False)
    assert call["decode_chunk_size"] == 4  # per-frame decode off: all frames at once
    v = call["videos"]
    assert v.shape == (1, 3, 4, 64, 64) and all(torch.equal(v[:, :, 0], v[:, :, k]) for k in range(4))
    assert seed == 99 and video.endswith(".mp4")
    svc.generate(image, steps=1, seed=1, perframe_ae=True)
    assert fake.calls[-1]["decode_chunk_size"] == 1


def test_random_seed_is_drawn_and_reported(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    seeds = {svc.generate(image, steps=1, seed=-1).seed for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= s < 2**32 for s in seeds)


def test_compare_gives_both_samplers_the_same_noise(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    stock, fixed, _ = compare_api(svc.compare(image, steps=3, seed=1234))
    assert [c["sampler"] for c in fake.calls] == ["stock", "fixed"]
    # Fresh generators seeded alike: the fake draws its video from them, so the two videos are equal.
    assert torch.equal(torch.from_numpy(iio.imread(stock)), torch.from_numpy(iio.imread(fixed)))


def test_sidecar_records_every_setting(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    video, _, _ = video_api(svc.generate(image, prompt="a dog", steps=5, eta=0.5, cfg_scale=2, fs=20, seed=3,
                               guidance_rescale=0.1, timestep_spacing="uniform"))
    record = json.loads(open(Service.sidecar_of(video)).read())
    expected = {"prompt": "a dog", "seed": 3, "steps": 5, "eta": 0.5, "cfg_scale": 2.0, "fs": 20,
                "sampler": "fixed", "timestep_spacing": "uniform", "guidance_rescale": 0.1, "model": "tiny",
                "perframe_ae": True}
    assert {k: record[k] for k in expected} == expected
    assert set(record["versions"]) >= {"dc_app", "torch", "gradio"}
    assert record["ddim_timesteps"] == [1, 201, 401, 601, 801] and record["report"].startswith("fixed: finite")


def container_fps(mp4: str) -> float:
    """The frame rate the mp4 plays at, as ffmpeg reads it from the file."""
    return iio.immeta(mp4)["fps"]


def test_config_video_fps_is_the_files_frame_rate(tmp_path, fake, image):
    """A config whose video_fps is not the default 8 plays at its own rate, and the sidecar says so; a server
    fps (app option) overrides the config's."""
    yaml = (CONFIG_DIR / "tiny.yaml").read_text()
    assert yaml.count("video_fps: 8") == 1
    custom = tmp_path / "tiny_12fps.yaml"
    custom.write_text(yaml.replace("video_fps: 8", "video_fps: 12"))
    model = stub_model(str(custom))
    assert model_spec(model.config).defaults.video_fps == 12
    for svc, fps in ((Service(model, output_dir=tmp_path), 12), (Service(model, output_dir=tmp_path, fps=5), 5)):
        for video in compare_api(svc.compare(image, steps=1, seed=1))[:2]:
            assert container_fps(video) == fps
            assert json.loads(open(Service.sidecar_of(video)).read())["fps"] == fps


def test_output_names_are_random_never_the_prompt(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    a, _, _ = video_api(svc.generate(image, prompt="../../etc/passwd", steps=1, seed=1))
    b, _, _ = video_api(svc.generate(image, prompt="../../etc/passwd", steps=1, seed=1))
    assert a != b
    for p in (a, b):
        assert str(svc.store.dir) in p and "passwd" not in p and len(p.split("/")[-1]) > 32


def test_interpolate_needs_the_interp_model(tmp_path, fake, image):
    with pytest.raises(InputError, match="start the app with --model 512_interp"):
        Service(stub_model(), output_dir=tmp_path).interpolate(image, image)
    svc = Service(stub_model("512_interp", latent=(8, 8), frames=4), output_dir=tmp_path)
    red = image
    blue = str(tmp_path / "blue.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(blue)
    svc.interpolate(red, blue, steps=2, seed=1)
    call = fake.calls[-1]
    v = call["videos"]
    assert (call["interp"], call["loop"], call["fs"]) == (True, False, 5)
    assert v[0, 0, 0].mean() > 0.5 and v[0, 2, -1].mean() > 0.9  # first frame red, last frame blue
    svc.interpolate(red, None, steps=2, seed=1)
    assert fake.calls[-1]["loop"] is True and torch.equal(fake.calls[-1]["videos"][:, :, 0],
                                                          fake.calls[-1]["videos"][:, :, -1])


# ------------------------------------------------------------------------------------- report wording


def test_report_stock_nan_and_fixed_finite(tmp_path, fake, image):
    fake.nan_from["stock"] = 0
    svc = Service(stub_model(), output_dir=tmp_path)
    stock, fixed, report = compare_api(svc.compare(image, steps=7, eta=1.0, timestep_spacing="uniform_trailing", seed=5))
    lines = report.splitlines()
    assert lines[0].startswith("stock: NaN from step 1 of 7 (t=999): video is black (")
    assert lines[1].startswith("fixed: finite (") and lines[1].endswith(" s)")
    assert lines[2].startswith("Memory for 4 frames: needs about")  # the estimate against this machine
    assert "seed 5" in lines[3] and "7 steps (uniform_trailing)" in lines[3]
    assert iio.imread(stock).max() <= 2 and iio.imread(fixed).std() > 20


def test_report_stock_crash_has_no_video(tmp_path, fake, image):
    fake.raise_for["stock"] = StockIndexError("uniform spacing cannot do 36 steps: timestep 1000 is out of range 0..999")
    svc = Service(stub_model(), output_dir=tmp_path)
    stock, fixed, report = compare_api(svc.compare(image, steps=36, timestep_spacing="uniform", seed=5))
    assert stock is None and fixed.endswith(".mp4")
    lines = report.splitlines()
    assert lines[0].startswith("stock: crashed: uniform spacing cannot do 36 steps")
    assert lines[2] == "steps: uniform spacing runs 38 steps for the 36 asked (upstream's rounding, kept so " \
                       "results match upstream's)"
    assert lines[3] == "fixed: timestep 1000 is outside 0..999; it ran 999 instead"
    assert len(results(svc)) == 2  # the fixed mp4 and its JSON only
    with pytest.raises(RunFailed, match="^stock: crashed: uniform spacing cannot do 36 steps"):
        svc.generate(image, steps=36, timestep_spacing="uniform", sampler="stock")


def test_report_partial_nan(tmp_path, fake, image, monkeypatch):
    real = fake.__call__

    def half_nan(*args, **kwargs):
        result = real(*args, **kwargs)
        result.videos[..., :32] = math.nan
        result.nonfinite = {"step": 2, "index": 2, "timestep": 399, "stage": "x_prev"}
        return result

    monkeypatch.setattr(service_mod, "run_synthesis", half_nan)
    _, report, _ = video_api(Service(stub_model(), output_dir=tmp_path).generate(image, steps=5, sampler="stock", seed=1))
    assert report.startswith("stock: NaN from step 3 of 5 (t=399): 50% of the video is black")


def test_fixed_sampler_error_is_not_called_a_stock_crash(tmp_path, fake, image):
    fake.raise_for["fixed"] = RuntimeError("shape mismatch")
    svc = Service(stub_model(), output_dir=tmp_path)
    with pytest.raises(RunFailed) as err:
        svc.generate(image, steps=2)
    assert str(err.value).startswith("internal error while sampling with the fixed sampler (RuntimeError)")
    assert "shape mismatch" not in str(err.value)  # no internals in what the person sees


# ------------------------------------------------------------------------ cancellation, OOM, faults, lock


def test_cancel_stops_within_one_step_and_leaves_nothing(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    cancel = threading.Event()
    seen = []

    def progress(step, total, label):
        seen.append(step)
        if step == 3:
            cancel.set()

    with pytest.raises(Cancelled, match="^cancelled at step 3 of 50$"):
        svc.generate(image, steps=50, progress=progress, cancel=cancel)
    assert seen == [1, 2, 3] and results(svc) == []
    svc.generate(image, steps=2, seed=1)  # the lock was released
    assert len(results(svc)) == 2


def test_cancel_while_waiting_for_the_device(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    svc._lock.acquire()  # another run holds the device
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="before it started"):
            svc.generate(image, steps=2, cancel=cancel)
    finally:
        svc._lock.release()
    assert time.monotonic() - started < 2 and fake.calls == []


def test_one_generation_at_a_time(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    active, peak = [0], [0]
    real = fake.__call__

    def slow(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    service_mod.run_synthesis = slow
    try:
        threads = [threading.Thread(target=svc.generate, args=(image,), kwargs=dict(steps=1, seed=i))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        service_mod.run_synthesis = fake
    assert peak[0] == 1 and len(results(svc)) == 8


def test_out_of_memory_gives_advice_and_the_next_run_works(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path, fault=parse_fault("oom@step2"))
    with pytest.raises(OutOfMemory) as err:
        svc.compare(image, steps=5, seed=1)
    message = str(err.value)
    assert message.startswith("out of memory on cpu at step 2 of the tiny model")
    assert "--low-vram" in message and "smaller model" in message
    assert err.value.__traceback__ is not None and err.value.__context__ is None  # tensors not held
    assert results(svc) == []
    svc.compare(image, steps=5, seed=1)  # the fault fired once, like a transient failure
    assert len(results(svc)) == 4


def test_host_memory_error_is_reported_the_same_way(tmp_path, fake, image):
    fake.raise_for["fixed"] = MemoryError()
    with pytest.raises(OutOfMemory, match="^out of memory on cpu"):
        Service(stub_model(), output_dir=tmp_path).generate(image, steps=2)


def test_writer_failure_leaves_no_partial_file(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path, fault=parse_fault("writer@frame2"))
    with pytest.raises(RunFailed, match=r"^internal error while writing the video \(InjectedFault\)"):
        svc.generate(image, steps=2, seed=1)
    assert results(svc) == []
    svc.generate(image, steps=2, seed=1)
    assert len(results(svc)) == 2


def test_writer_failure_in_the_second_video_removes_the_first(tmp_path, fake, image):
    class FailOnFrameCall:
        """Fails the n-th frame written in this process: n = 6 is frame 2 of compare's second video."""

        def __init__(self, n):
            self.n, self.calls = n, 0

        def at_step(self, step):
            pass

        def take_free_memory(self):
            return None  # the device's own

        def at_frame(self, frame):
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("disk full")

    svc = Service(stub_model(), output_dir=tmp_path, fault=FailOnFrameCall(6))
    with pytest.raises(RunFailed, match="writing the video"):
        svc.compare(image, steps=2, seed=1)
    assert svc.fault.calls == 6 and results(svc) == []  # the finished stock mp4 and JSON were removed too


def test_raise_fault_inside_the_sampler(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path, fault=parse_fault("raise@step2"))
    with pytest.raises(RunFailed, match=r"^internal error while sampling with the stock sampler \(InjectedFault\)"):
        svc.generate(image, steps=3, sampler="stock")  # not mistaken for a stock crash
    svc.generate(image, steps=3, sampler="stock")
    assert len(results(svc)) == 2


def test_fault_spec_is_checked():
    assert parse_fault(None) is None and parse_fault("") is None
    plan = parse_fault("raise@step2, oom@step3,writer@frame1")
    assert [str(f) for f in plan.armed] == ["raise@step2", "oom@step3", "writer@frame1"]
    for bad in ("oom@frame2", "oom@step0", "boom@step1", "oom", "free-memory@", "free-memory@1.5"):
        with pytest.raises(ValueError, match="DC_APP_FAULT"):
            parse_fault(bad)
    plan = parse_fault("free-memory@3")
    assert plan.take_free_memory() == 3 * 2**20 and plan.take_free_memory() is None  # once, like the others


# ------------------------------------------------------------------------------------------- storage


def test_storage_sweeps_by_age_and_size(tmp_path):
    store = OutputStore(tmp_path, max_bytes=2500, max_age_s=2 * 3600)
    now = time.time()
    files = {}
    for name, age, size in [("old.mp4", 3 * 3600, 10), ("a.mp4", 1800, 1000), ("b.mp4", 600, 1000),
                            ("c.mp4", 60, 1000), (".x.partial.mp4", 3600, 10), (".y.partial.mp4", 5, 10)]:
        p = store.dir / name
        p.write_bytes(b"0" * size)
        import os

        os.utime(p, (now - age, now - age))
        files[name] = p
    removed = {p.name for p in store.sweep(now)}
    # expired, a stale temp file, then the oldest result to get under 2500 bytes; a fresh temp file stays
    assert removed == {"old.mp4", ".x.partial.mp4", "a.mp4"}
    assert sorted(p.name for p in store.dir.iterdir()) == [".y.partial.mp4", "b.mp4", "c.mp4"]
    with pytest.raises(ValueError, match="at least 3600"):
        OutputStore(tmp_path, max_age_s=MIN_KEEP_S - 1)


def test_new_paths_are_unique_and_inside(tmp_path):
    store = OutputStore(tmp_path)
    paths = {store.new_paths("fixed")[0] for _ in range(100)}
    assert len(paths) == 100 and all(p.parent == store.dir for p in paths)


# --------------------------------------------------------------------------------- the real tiny model


@pytest.fixture(scope="module")
def tiny_service(tmp_path_factory):
    from dc_app import load_pretrained

    return Service(load_pretrained("tiny", device="cpu"), output_dir=tmp_path_factory.mktemp("tiny"))


def test_tiny_generate_end_to_end(tiny_service, image):
    video, report, seed = video_api(tiny_service.generate(image, prompt="a red square", steps=1, seed=7))
    frames = iio.imread(video)
    assert frames.shape == (4, 64, 64, 3) and frames.std() > 1
    assert report.startswith("fixed: finite (") and seed == 7
    again, _, _ = video_api(tiny_service.generate(image, prompt="a red square", steps=1, seed=7))
    other, _, _ = video_api(tiny_service.generate(image, prompt="a red square", steps=1, seed=8))
    assert (iio.imread(again).astype(int) - frames).__abs__().max() <= 1  # same seed: same video
    assert (iio.imread(other).astype(int) - frames).__abs__().mean() > 1


def test_tiny_service_fps_is_the_files_frame_rate(tiny_service, image, tmp_path):
    """Service(fps=...) is what the mp4 plays at (every config says 8, so 8 proves nothing), and the sidecar
    records the file's rate."""
    svc = Service(tiny_service.model, output_dir=tmp_path, fps=5)
    video, _, _ = video_api(svc.generate(image, steps=1, seed=2))
    assert container_fps(video) == 5 and iio.imread(video).shape[0] == svc.frames
    assert json.loads(open(Service.sidecar_of(video)).read())["fps"] == 5


def test_tiny_cancel_and_oom_inside_the_real_sampler(tiny_service, image):
    cancel = threading.Event()
    steps_seen = []

    def progress(step, total, label):
        steps_seen.append(step)
        if step == 2:
            cancel.set()

    before = results(tiny_service)
    with pytest.raises(Cancelled, match="^cancelled at step 2 of 20$"):
        tiny_service.generate(image, steps=20, seed=1, progress=progress, cancel=cancel)
    assert steps_seen == [1, 2]
    tiny_service.fault = parse_fault("oom@step2")
    try:
        with pytest.raises(OutOfMemory, match="fewer steps"):
            tiny_service.generate(image, steps=3, seed=1)
    finally:
        tiny_service.fault = None
    assert results(tiny_service) == before


def test_tiny_interpolation_and_loop_through_the_real_pipeline(tiny_service, image, tmp_path):
    # The tiny model is not an interpolation model; its defaults are switched so the service's interp path and
    # the pipeline's first-and-last-frame conditioning run for real.
    from dataclasses import replace

    svc = Service(tiny_service.model, output_dir=tmp_path)
    svc.defaults = replace(svc.defaults, interp=True)
    blue = str(tmp_path / "blue.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    video, report, seed = video_api(svc.interpolate(image, blue, prompt="red to blue", steps=1, seed=3))
    assert iio.imread(video).shape == (4, 64, 64, 3) and report.startswith("fixed: finite") and seed == 3
    record = json.loads(open(Service.sidecar_of(video)).read())
    assert (record["interp"], record["loop"]) == (True, False)
    video, _, _ = video_api(svc.interpolate(image, None, steps=1, seed=3))
    assert json.loads(open(Service.sidecar_of(video)).read())["loop"] is True


# ------------------------------------------------------------- server settings: decode chunk, CFG mode, VRAM


def test_server_settings_reach_the_pipeline(tmp_path, fake, image):
    default = Service(stub_model(), output_dir=tmp_path)
    default.generate(image, steps=1, seed=1)
    # tiny decodes per frame by default; CFG is batched unless the server says otherwise
    assert (fake.calls[-1]["decode_chunk_size"], fake.calls[-1]["batched_cfg"]) == (1, True)

    svc = Service(stub_model(), output_dir=tmp_path, decode_chunk_size=2, cfg_mode="two-call")
    # A server chunk replaces the model's per-frame default, also for the UI's and the API's defaults.
    assert svc.defaults.perframe_ae is False and default.defaults.perframe_ae is True
    video, _, _ = video_api(svc.generate(image, steps=1, seed=1))
    assert (fake.calls[-1]["decode_chunk_size"], fake.calls[-1]["batched_cfg"]) == (2, False)
    record = json.loads(open(Service.sidecar_of(video)).read())
    assert (record["decode_chunk_size"], record["cfg_mode"], record["perframe_ae"]) == (2, "two-call", False)
    svc.generate(image, steps=1, seed=1, perframe_ae=True)  # a request can still ask for per-frame decode
    assert fake.calls[-1]["decode_chunk_size"] == 1
    svc.compare(image, steps=1, seed=1)
    assert [c["batched_cfg"] for c in fake.calls[-2:]] == [False, False]

    # A chunk larger than the video is the whole video; a chunk of 1 makes per-frame decode the default.
    Service(stub_model(), output_dir=tmp_path, decode_chunk_size=64).generate(image, steps=1, seed=1)
    assert fake.calls[-1]["decode_chunk_size"] == 4
    assert Service(stub_model("256", latent=(32, 32)), output_dir=tmp_path,
                   decode_chunk_size=1).defaults.perframe_ae is True


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg_mode="single"), "cfg_mode 'single': expected one of batched, two-call"),
    (dict(decode_chunk_size=0), "decode_chunk_size 0: expected a whole number of frames, 1 or more"),
    (dict(decode_chunk_size=1.5), "decode_chunk_size 1.5: expected a whole number of frames, 1 or more"),
    (dict(decode_chunk_size=True), "decode_chunk_size True: expected a whole number of frames, 1 or more"),
])
def test_bad_server_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        Service(stub_model(), output_dir=tmp_path, **kwargs)
    assert str(err.value) == message


def test_tiny_sidecar_records_the_performance_settings_and_no_vram_on_cpu(tmp_path, image):
    from dc_app.loading import load_for_serving

    model = load_for_serving("tiny", device="cpu", dtype="bf16", offload="all")
    svc = Service(model, output_dir=tmp_path, decode_chunk_size=3, cfg_mode="two-call")
    stock, fixed, report = compare_api(svc.compare(image, steps=2, seed=11))
    for video, sampler in ((stock, "stock"), (fixed, "fixed")):
        record = json.loads(open(Service.sidecar_of(video)).read())
        expected = {"sampler": sampler, "device": "cpu", "dtype": "bf16", "vae_dtype": "fp32", "offload": "all",
                    "decode_chunk_size": 3, "cfg_mode": "two-call"}
        assert {k: record[k] for k in expected} == expected
        # A CPU run says nothing about VRAM: no field, no figure in its report line.
        assert "peak_vram_bytes" not in record and "VRAM" not in record["report"]
        assert iio.imread(video).shape == (4, 64, 64, 3)
    assert "VRAM" not in report


def test_peak_memory_on_cuda_is_measured_around_the_run_and_reported(monkeypatch):
    """The CUDA branch without a GPU: torch.cuda's two counters are replaced by a recorder, everything else
    (when they are called, the line, the sidecar field) is the service's own code."""
    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: events.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device: events.append(("peak", device)) or 9_876_543_210)
    gpu = torch.device("cuda", 1)
    with PeakMemory(gpu) as peak:
        events.append("run")
    assert events == [("reset", gpu), "run", ("peak", gpu)]  # the counter restarts for each run
    assert peak.bytes == 9_876_543_210
    assert run_note(12.34, peak.bytes) == "(12.3 s, peak VRAM 9.20 GiB)"  # 9876543210 / 2**30 = 9.198...

    events.clear()
    with PeakMemory("cpu") as cpu_peak:
        events.append("run")
    assert events == ["run"] and cpu_peak.bytes is None  # no CUDA call, no figure
    assert run_note(12.34, None) == "(12.3 s)"


def test_sidecar_has_the_peak_only_when_measured(tmp_path):
    svc = Service(stub_model(), output_dir=tmp_path)
    settings = svc.settings_for(dict(steps=1, seed=1))
    run = SamplerOutcome("fixed", FINITE, 1.0, timesteps=(999,))
    measured = svc._sidecar(settings, 1, replace(run, peak_bytes=123_456), 4, False, False)
    unmeasured = svc._sidecar(settings, 1, run, 4, False, False)
    assert measured["peak_vram_bytes"] == 123_456 and "peak_vram_bytes" not in unmeasured


# ------------------------------------------------------------------------------ samplers and grids (issue 11)


def test_compare_runs_stock_beside_the_chosen_sampler(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    result = svc.compare(image, steps=3, seed=4, sampler="unipc", timestep_spacing="uniform_trailing")
    assert [c["sampler"] for c in fake.calls] == ["stock", "unipc"]
    assert [o.sampler for o in result.outcomes] == ["stock", "unipc"] and result.main.sampler == "unipc"
    assert result.report().splitlines()[1].startswith("unipc: finite")
    with pytest.raises(InputError, match="^sampler: compare runs stock beside another sampler"):
        svc.compare(image, steps=3, sampler="stock")


def test_stock_runs_the_models_spacing_on_a_grid_it_cannot_run(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)  # tiny: uniform_trailing by default
    result = svc.compare(image, steps=5, seed=4, sampler="dpmpp_2m", timestep_spacing="logsnr")
    assert [(c["sampler"], c["spacing"]) for c in fake.calls] == [("stock", "uniform_trailing"),
                                                                  ("dpmpp_2m", "logsnr")]
    assert ("stock: runs upstream's spacings only; it ran uniform_trailing (the model's default), not logsnr"
            in result.report().splitlines())
    sidecars = [json.loads(open(o.sidecar).read()) for o in result.outcomes]
    assert [(r["sampler"], r["timestep_spacing"]) for r in sidecars] == [("stock", "uniform_trailing"),
                                                                        ("dpmpp_2m", "logsnr")]



def test_tiny_deterministic_samplers_say_they_ignore_eta(tiny_service, image):
    result = tiny_service.generate(image, steps=2, seed=5, eta=1.0, sampler="dpmpp_2m", timestep_spacing="logsnr")
    notices = [line for line in result.report().splitlines() if line.startswith("eta=")]
    assert len(notices) == 1 and "dpmpp_2m is deterministic" in notices[0]
    assert json.loads(open(result.sidecar).read())["notices"] == notices
    quiet = tiny_service.generate(image, steps=2, seed=5, eta=0.0, sampler="dpmpp_2m", timestep_spacing="logsnr")
    assert not [line for line in quiet.report().splitlines() if line.startswith("eta=")]


# ----------------------------------------------------------------------------------- long videos (issue 12)


@pytest.mark.parametrize("sampler", ["fixed", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_tiny_longer_video_through_the_service(tiny_service, image, sampler):
    # T = 4: 10 frames is not a multiple of the stride (1), 7 windows; every sampler stays finite.
    progress_labels = set()
    result = tiny_service.generate(image, steps=2, seed=6, frames=10, sampler=sampler,
                                   progress=lambda step, total, label: progress_labels.add(label))
    assert result.main.finite and iio.imread(result.video).shape == (10, 64, 64, 3)
    assert "frames: 10 from 7 overlapping windows of 4 frames; about 7x the UNet time of a 4-frame video" in \
        result.report().splitlines()
    record = json.loads(open(result.sidecar).read())
    assert record["frames"] == 10 and record["long_video"]["windows"] == 7 and record["long_video"]["stride"] == 1
    assert any("UNet call" in label for label in progress_labels)  # progress counts UNet calls


def test_frames_are_checked_against_the_model(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)  # tiny: T = 4, so 4..32
    for bad in (3, 33):
        with pytest.raises(InputError, match=rf"^frames: expected a whole number from 4 to 32, got {bad}$"):
            svc.generate(image, frames=bad)
    interp = Service(stub_model("tiny_interp"), output_dir=tmp_path)
    with pytest.raises(InputError, match="^frames: interpolation models make exactly their 4 frames"):
        interp.compare(image, frames=8)
    assert fake.calls == []  # refused before any work


@pytest.fixture(scope="module")
def tiny_interp_service(tmp_path_factory):
    from dc_app import load_pretrained

    return Service(load_pretrained("tiny_interp", device="cpu"), output_dir=tmp_path_factory.mktemp("interp"))


@pytest.fixture
def keyframes(tmp_path):
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40)]
    paths = []
    for k, colour in enumerate(colours):
        paths.append(str(tmp_path / f"k{k}.png"))
        Image.new("RGB", (96, 64), colour).save(paths[-1])
    return paths


@pytest.mark.parametrize("count, loop, expected", [(3, False, 7), (4, False, 10), (3, True, 9), (4, True, 12)])
def test_tiny_storyboard_frame_counts(tiny_interp_service, keyframes, count, loop, expected):
    # T = 4: (K - 1)(T - 1) + 1 frames, or K (T - 1) with loop (each shared keyframe once).
    result = tiny_interp_service.storyboard(keyframes[:count], loop=loop, steps=1, seed=4)
    assert result.main.finite and iio.imread(result.video).shape == (expected, 64, 64, 3)
    record = json.loads(open(result.sidecar).read())
    order = list(range(count)) + ([0] if loop else [])
    assert record["long_video"]["keyframe_order"] == order and record["seed"] == 4


def test_tiny_storyboard_prompts_and_sizes(tiny_interp_service, keyframes, tmp_path):
    wide = str(tmp_path / "wide.png")
    Image.new("RGB", (300, 64), (10, 10, 10)).save(wide)
    result = tiny_interp_service.storyboard([keyframes[0], wide, keyframes[1]], ["a", "b"], steps=1, seed=1)
    assert "keyframes: keyframe 2 is 300x64, the first 96x64; each was cropped to the model's frame" in \
        result.report().splitlines()
    with pytest.raises(InputError, match=r"^prompts: expected one prompt, or one per segment \(2 for 3 keyframes\)"):
        tiny_interp_service.storyboard(keyframes[:3], ["a", "b", "c"], steps=1)
    with pytest.raises(InputError, match="^keyframes: expected a list of 2 to 9 images, got 10 images"):
        tiny_interp_service.storyboard((keyframes * 3)[:10], steps=1)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match=r"^keyframes\[1\]: not an image file"):
        tiny_interp_service.storyboard([keyframes[0], str(text)], steps=1)


def test_storyboard_needs_an_interpolation_model(tmp_path, fake, image):
    with pytest.raises(InputError, match="^storyboard: the tiny model cannot interpolate"):
        Service(stub_model(), output_dir=tmp_path).storyboard([image, image])


def test_tiny_extend_joins_the_upload_and_its_continuation(tiny_service, image, tmp_path):
    first = tiny_service.generate(image, steps=1, seed=3)  # 4 frames of 64x64
    result = tiny_service.extend(str(first.video), steps=1, seed=4, frames=6)
    joined = iio.imread(result.video)
    assert joined.shape == (4 + 6 - 1, 64, 64, 3)  # the continuation's first frame re-creates the last one
    record = json.loads(open(result.sidecar).read())
    assert record["extend"] == {"continuation_frames": 6, "joined_frames": 9} and record["seed"] == 4
    # The continuation starts from the upload's last frame: the join has no jump there.
    original = iio.imread(first.video).astype(float)
    assert np.abs(joined[3].astype(float) - original[3]).mean() < 12


def test_extend_refuses_what_it_cannot_continue(tmp_path, fake, image):
    svc = Service(stub_model(), output_dir=tmp_path)
    with pytest.raises(InputError, match="^video: no such file"):
        svc.extend(str(tmp_path / "missing.mp4"))
    with pytest.raises(InputError, match="^video: (not a video file ffmpeg can read|the video does not say how long)"):
        svc.extend(image)  # a PNG: ffmpeg opens it, but it has no duration to check
    with pytest.raises(InputError, match="^extend: the tiny_interp model interpolates"):
        Service(stub_model("tiny_interp"), output_dir=tmp_path).extend(image)
    assert fake.calls == []
