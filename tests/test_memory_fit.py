"""Will it fit: the memory estimate against the device, in the service (refuse, warn, report, sidecar), the CLI's
`estimate` and the UI's line. The estimate's own accuracy is tested in test_memory_estimate.py; here the device's
free memory is set by the test, so every verdict is forced and checked against the estimate recomputed."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from dc_app import load_pretrained
from dc_app import service as service_mod
from dc_app.__main__ import main
from dc_app.memory_fit import DOES_NOT_FIT, FITS, MAY_NOT_FIT, MemorySetup, check_fit, held_bytes
from dc_app.models.token_chunking import TokenChunking
from dc_app.service import NotEnoughMemory, Service

# What each start option named in advice means, written out here (not read from dc_app): a test that the named
# option really makes the estimate fit.
OPTION_MEANING = {
    "--ff-chunk-size 4096": dict(ff_chunking=TokenChunking(tokens=4096)),
    "--cfg-mode two-call": dict(cfg_mode="two-call"),
    "--offload all": dict(offload="all"),
    "--dtype bf16": dict(dtype="bf16"),
    "--weights-dtype int8": dict(weights_dtype="int8"),
    "--low-vram": dict(dtype="bf16", offload="all", decode_chunk_size=1, ff_chunking=TokenChunking(tokens=4096),
                       weights_dtype="int8", cfg_mode="two-call"),
}


def setup(**values) -> MemorySetup:
    return MemorySetup(**{"model": "tiny", "frames": 4, "device_type": "cpu", **values})


def test_the_verdict_follows_the_range():
    estimate = setup().estimate()
    low, high = estimate.total
    assert 0 < low < high
    assert check_fit(setup(), free=high, held=0).verdict == FITS
    at_risk = check_fit(setup(), free=(low + high) // 2, held=0)
    assert at_risk.verdict == MAY_NOT_FIT and at_risk.warning().startswith("memory: this run needs")
    refused = check_fit(setup(), free=low - 1, held=0)
    assert refused.verdict == DOES_NOT_FIT and refused.warning() is None
    assert refused.refusal().startswith("not enough RAM: this run needs at least")
    # What the loaded model holds counts as available: it is part of the estimate's total.
    assert check_fit(setup(), free=high - 1000, held=1000).verdict == FITS


def named_option(advice: str) -> str:
    match = re.search(r"start the app \(or the CLI\) with (--[\w-]+(?: [\w-]+)?)", advice)
    assert match, advice
    return match.group(1)


@pytest.mark.parametrize("option", ["--cfg-mode two-call", "--dtype bf16", "--low-vram"])
def test_the_refusal_names_an_option_that_makes_it_fit(option):
    """Make `option` the one that fits: free memory between its estimate and the current one."""
    current = setup(frames=4).estimate().total[0]
    better = setup(**OPTION_MEANING[option]).estimate().total[0]
    assert better < current, f"{option} does not lower the tiny model's estimate"
    fit = check_fit(setup(), free=(better + current) // 2, held=0)
    assert fit.verdict == DOES_NOT_FIT
    named = named_option(fit.advice)
    # The option named fits by the estimate, whichever of the cheaper ones it is.
    assert setup(**OPTION_MEANING[named]).estimate().total[0] <= fit.available
    assert named in fit.refusal()


def test_a_request_setting_is_suggested_before_a_restart():
    # 32 frames of a 4-frame model: the decode phase grows with N; 4 frames is the request-level fix.
    long = setup(frames=32, decode_chunk_size=32)
    current, shorter = long.estimate().total[0], setup(frames=4, decode_chunk_size=32).estimate().total[0]
    perframe = setup(frames=32, decode_chunk_size=1).estimate().total[0]
    fit = check_fit(long, free=max(shorter, perframe) + (current - max(shorter, perframe)) // 2, held=0)
    assert fit.verdict == DOES_NOT_FIT
    assert fit.advice in ("To fit: turn on VAE per-frame decode (advanced settings).", "To fit: ask for 4 frames.")


def test_nothing_fits_says_so():
    fit = check_fit(setup(), free=1, held=0)
    assert fit.advice.startswith("Even with every low-memory option it needs about")


# ------------------------------------------------------------------------------------------------ service
@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("tiny", device="cpu")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (80, 64), (20, 120, 200)).save(path)
    return str(path)


def set_free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(service_mod, "free_memory", lambda device: nbytes)


def test_held_bytes_counts_the_loaded_weights(tiny):
    expected = sum(t.numel() * t.element_size() for t in [*tiny.parameters(), *tiny.buffers()])
    assert held_bytes(tiny) == expected


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tiny, image, tmp_path, monkeypatch):
    svc = Service(tiny, output_dir=tmp_path)
    low = svc.memory_setup(svc.settings_for({}, "generate")).estimate().total[0]
    set_free(monkeypatch, low - held_bytes(tiny) - 1)
    calls = []
    monkeypatch.setattr(service_mod, "run_synthesis", lambda *a, **k: calls.append(1))
    with pytest.raises(NotEnoughMemory, match="^not enough RAM: this run needs at least") as err:
        svc.generate(image, steps=2, seed=1)
    assert "To fit" in str(err.value) or "Even with every low-memory option" in str(err.value)
    assert calls == [] and list(svc.store.dir.iterdir()) == []


def test_a_run_at_risk_runs_with_a_warning_and_records_the_estimate(tiny, image, tmp_path, monkeypatch):
    svc = Service(tiny, output_dir=tmp_path)
    low, high = svc.memory_setup(svc.settings_for({}, "generate")).estimate().total
    set_free(monkeypatch, (low + high) // 2 - held_bytes(tiny))
    result = svc.generate(image, steps=2, seed=1)
    report = result.report()
    assert "memory: this run needs" in report and "may not fit" in report
    record = json.loads(result.sidecar.read_text())["memory_estimate"]
    assert (record["low_bytes"], record["high_bytes"], record["verdict"]) == (low, high, MAY_NOT_FIT)
    assert record["available_bytes"] == (low + high) // 2


def test_a_run_that_fits_reports_the_estimate(tiny, image, tmp_path):
    svc = Service(tiny, output_dir=tmp_path)
    result = svc.generate(image, steps=2, seed=1)
    assert re.search(r"^Memory for 4 frames: needs about [\d.]+-[\d.]+ [MG]iB; this machine has .*: fits\.$", result.report(),
                     re.M), result.report()
    record = json.loads(result.sidecar.read_text())
    assert record["memory_estimate"]["verdict"] == FITS
    assert (record["weights_dtype"], record["ff_chunk_size"]) == (None, None)


def test_the_ui_line_follows_frames_and_says_when_the_model_is_not_there(tiny, tmp_path, monkeypatch):
    svc = Service(tiny, output_dir=tmp_path)
    four, eight = svc.memory_line("generate", frames=4), svc.memory_line("generate", frames=8)
    assert four.startswith("Memory for 4 frames: needs about") and eight.startswith("Memory for 8 frames: needs")
    assert svc.memory_line("generate", frames=0).startswith("frames:")  # the field's own message
    monkeypatch.setattr(Service, "model_status", property(lambda self: ("loading", "reading the weights")))
    assert svc.memory_line("generate") == "Memory: estimated once the model has loaded."


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_estimate_prints_the_phases_and_the_verdict(capsys):
    assert main(["estimate", "--model", "tiny", "--device", "cpu", "--frames", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny model, 8 frames, on cpu: fp32")
    for phase in ("encode", "denoise", "decode"):
        assert re.search(rf"^  {phase} +weights +\d+\.\d\d GiB \+ activations", out, re.M), out
    assert re.search(r"^Memory for 8 frames: needs about .* GiB free: fits\.$", out, re.M), out


def test_cli_estimate_with_the_preset_and_a_device_too_small(capsys, monkeypatch):
    import dc_app.memory_estimate as estimate_mod

    monkeypatch.setattr(estimate_mod, "free_memory", lambda device: 1)
    assert main(["estimate", "--model", "tiny", "--device", "cpu", "--low-vram"]) == 1
    out = capsys.readouterr().out
    assert "low-vram preset, bf16" in out and ": does not fit." in out
    assert "Even with every low-memory option it needs about" in out


def test_a_failing_estimate_never_stops_a_run(tiny, image, tmp_path, monkeypatch, caplog):
    """The estimate is advice: if it breaks (a config it cannot trace), the run goes ahead as before, logged once."""
    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(MemorySetup, "estimate", broken)
    svc = Service(tiny, output_dir=tmp_path)
    with caplog.at_level("ERROR", logger="dc_app.service"):
        result = svc.generate(image, steps=2, seed=1)
        assert svc.memory_line("generate") == ""
    assert result.video.exists() and "Memory" not in result.report()
    assert json.loads(result.sidecar.read_text())["memory_estimate"] is None
    assert sum("the memory estimate failed" in r.getMessage() for r in caplog.records) == 1


def test_no_device_to_ask_means_no_estimate(tiny, tmp_path, monkeypatch):
    def no_gpu(device):
        raise RuntimeError("Found no NVIDIA driver")

    monkeypatch.setattr(service_mod, "free_memory", no_gpu)
    svc = Service(tiny, output_dir=tmp_path)
    assert svc.memory_fit(svc.settings_for({}, "generate")) is None and svc.memory_line("generate") == ""
