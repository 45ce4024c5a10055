"""The performance options end to end: app.py's options and environment forms, and `load_for_serving`, the one
place where they become model set-up (dtype, VAE dtype, offload, compile), plus the decode chunk the service
passes on. All on the tiny model and the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from gradio_client import Client, handle_file

from apphelpers import REPO, start_app, stop_app
from dc_app import load_for_serving, load_pretrained
from dc_app import service as service_mod
from dc_app.loading import offload_mode
from dc_app.models.diffusion import SCHEDULE_BUFFERS
from dc_app.pipeline import run_synthesis
from dc_app.service import Service

IMAGE = REPO / "assets" / "chelsea.jpg"
NETWORKS = ("model", "cond_stage_model", "embedder", "image_proj_model")  # UNet, CLIP text, CLIP image, Resampler
ENCODERS = {"cond_stage_model", "embedder", "image_proj_model"}


def app_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def param_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def synthesize(model, seed: int = 0, **kwargs) -> torch.Tensor:
    """Two CFG steps of the fixed sampler on a fixed input, all randomness from `seed`."""
    videos = torch.rand(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(123)) * 2 - 1
    return run_synthesis(model, "fixed", ["a cat"], videos, [1, 4, 4, 8, 8], ddim_steps=2,
                         unconditional_guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                         **kwargs).videos


# ------------------------------------------------------------------------------------------ app.py options
def test_app_help_lists_the_performance_options():
    proc = app_py("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for shown in ("--dtype {fp32,fp16,bf16}", "--vae-dtype {fp32,fp16,bf16}", "--offload {none,encoders,all}",
                  "--decode-chunk-size N", "--cfg-mode {batched,two-call}", "--compile, --no-compile",
                  "--ff-chunk-size N|SIZE", "--weights-dtype {fp8,int8}", "--low-vram, --no-low-vram"):
        assert shown in text, shown
    for env in ("DC_APP_DTYPE", "DC_APP_VAE_DTYPE", "DC_APP_OFFLOAD", "DC_APP_DECODE_CHUNK_SIZE", "DC_APP_CFG_MODE",
                "DC_APP_COMPILE", "DC_APP_FF_CHUNK_SIZE", "DC_APP_WEIGHTS_DTYPE", "DC_APP_LOW_VRAM"):
        assert f"(environment: {env})" in text, env


@pytest.mark.parametrize("args, env, message", [
    (["--vae-dtype", "fp8"], {}, "--vae-dtype/DC_APP_VAE_DTYPE: expected one of fp32, fp16, bf16, got 'fp8'"),
    ([], {"DC_APP_VAE_DTYPE": "half"}, "--vae-dtype/DC_APP_VAE_DTYPE: expected one of fp32, fp16, bf16, got 'half'"),
    ([], {"DC_APP_DTYPE": "float8"}, "--dtype/DC_APP_DTYPE: expected one of fp32, fp16, bf16, got 'float8'"),
    (["--offload", "gpu"], {}, "--offload/DC_APP_OFFLOAD: expected one of none, encoders, all, got 'gpu'"),
    ([], {"DC_APP_OFFLOAD": "vae"}, "--offload/DC_APP_OFFLOAD: expected one of none, encoders, all, got 'vae'"),
    (["--decode-chunk-size", "0"], {},
     "--decode-chunk-size/DC_APP_DECODE_CHUNK_SIZE: expected a whole number of frames, 1 or more, got '0'"),
    ([], {"DC_APP_DECODE_CHUNK_SIZE": "two"},
     "--decode-chunk-size/DC_APP_DECODE_CHUNK_SIZE: expected a whole number of frames, 1 or more, got 'two'"),
    (["--cfg-mode", "one-call"], {}, "--cfg-mode/DC_APP_CFG_MODE: expected one of batched, two-call, got 'one-call'"),
    ([], {"DC_APP_COMPILE": "maybe"},
     "--compile/DC_APP_COMPILE: expected one of 1, true, yes, on, 0, false, no, off, got 'maybe'"),
    ([], {"DC_APP_FF_CHUNK_SIZE": "lots"}, "--ff-chunk-size/DC_APP_FF_CHUNK_SIZE: expected a number of tokens "
                                           "(e.g. 4096) or a memory budget (e.g. 64MiB, 0.5GB), got 'lots'"),
    (["--weights-dtype", "int4"], {}, "--weights-dtype/DC_APP_WEIGHTS_DTYPE: expected one of fp8, int8, got 'int4'"),
    ([], {"DC_APP_LOW_VRAM": "please"},
     "--low-vram/DC_APP_LOW_VRAM: expected one of 1, true, yes, on, 0, false, no, off, got 'please'"),
])
def test_app_refuses_bad_values_naming_the_option_and_the_allowed_values(tmp_path, args, env, message):
    proc = app_py("--model", "tiny", *args, env={"DC_APP_OUTPUT_DIR": str(tmp_path), **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "loading" not in proc.stderr  # refused before any model work


def test_app_applies_the_environment_forms(tmp_path):
    """The app started with DC_APP_* only: the model and the service it builds use every one of them."""
    app = start_app(tmp_path, via_env=True, extra_env={
        "DC_APP_DTYPE": "bf16", "DC_APP_VAE_DTYPE": "bf16", "DC_APP_OFFLOAD": "all",
        "DC_APP_DECODE_CHUNK_SIZE": "2", "DC_APP_CFG_MODE": "two-call", "DC_APP_COMPILE": "no",
        "DC_APP_FF_CHUNK_SIZE": "64MiB", "DC_APP_WEIGHTS_DTYPE": "int8"})
    try:
        video, report, seed = Client(app.url, verbose=False).predict(handle_file(IMAGE), steps=1, seed=6,
                                                                     api_name="/generate")
        assert seed == 6 and "VRAM" not in report
        (sidecar,) = app.results_dir.glob("*.json")
        record = json.loads(sidecar.read_text())
        expected = {"dtype": "bf16", "vae_dtype": "bf16", "offload": "all", "decode_chunk_size": 2,
                    "cfg_mode": "two-call", "perframe_ae": False, "weights_dtype": "int8",
                    "ff_chunk_size": "64 MiB budget"}
        assert {k: record[k] for k in expected} == expected
        assert ("bf16, VAE bf16, CFG two-call, UNet weights int8, transformer chunks: 64 MiB budget, offload all, "
                "decode 2 frames at a time") in app.log()
    finally:
        stop_app(app)


# --------------------------------------------------------------------------------------- load_for_serving
def test_dtype_applies_to_the_networks_and_not_to_the_vae_or_the_schedule():
    reference = load_pretrained("tiny", device="cpu")
    model = load_for_serving("tiny", device="cpu", dtype="bf16")
    for name in NETWORKS:
        assert param_dtypes(getattr(model, name)) == {torch.bfloat16}, name
    assert param_dtypes(model.first_stage_model) == {torch.float32}  # the VAE's default: float32
    for name in SCHEDULE_BUFFERS:
        buffer = getattr(model, name)
        assert buffer.dtype == torch.float32 and torch.equal(buffer, getattr(reference, name)), name
    assert (offload_mode(model), model.device.type) == ("none", "cpu")

    vae_half = load_for_serving("tiny", device="cpu", dtype="fp16", vae_dtype="bf16")
    assert param_dtypes(vae_half.model) == {torch.float16}
    assert param_dtypes(vae_half.first_stage_model) == {torch.bfloat16}

    plain = load_for_serving("tiny", device="cpu")
    for name in (*NETWORKS, "first_stage_model"):
        assert param_dtypes(getattr(plain, name)) == {torch.float32}, name


def test_8bit_weights_and_chunking_are_set_up_and_stay_close_to_the_plain_model():
    from dc_app.models.weight_storage import weight_storage_kind

    plain = load_for_serving("tiny", device="cpu", dtype="bf16")
    lean = load_for_serving("tiny", device="cpu", dtype="bf16", weights_dtype="int8", ff_chunk_size="64")
    assert weight_storage_kind(lean.model.diffusion_model) == "int8" and str(lean.ff_chunking) == "64 tokens"
    # Only the UNet is stored in 8 bits; the encoders and the VAE keep their dtypes.
    assert weight_storage_kind(lean) == weight_storage_kind(lean.model) == "int8"
    for name in ("cond_stage_model", "embedder", "image_proj_model", "first_stage_model"):
        assert weight_storage_kind(getattr(lean, name)) is None, name
    assert lean.dtype == torch.bfloat16
    expected, got = synthesize(plain, seed=3), synthesize(lean, seed=3)
    assert torch.isfinite(got).all()
    # int8 storage's documented error (docs/low-memory.md, bf16 compute; test_weight_storage.py's bound).
    assert ((got - expected).norm() / expected.norm()).item() < 0.15


def test_fp8_where_torch_lacks_it_stops_before_loading(monkeypatch):
    from dc_app.loading import build
    from dc_app.models.weight_storage import WeightStorageUnsupported

    monkeypatch.delattr(torch, "float8_e4m3fn")
    monkeypatch.setattr(build, "load_pretrained", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(WeightStorageUnsupported, match=r"--weights-dtype int8"):
        load_for_serving("tiny", device="cpu", weights_dtype="fp8")


@pytest.mark.parametrize("offload, kept", [("encoders", ENCODERS), ("all", ENCODERS | {"first_stage_model"})])
def test_offload_on_cpu_keeps_everything_on_cpu_and_changes_nothing(offload, kept):
    model = load_for_serving("tiny", device="cpu", offload=offload)
    assert model.offloaded == kept and offload_mode(model) == offload
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    expected = synthesize(load_for_serving("tiny", device="cpu"), seed=5)
    assert torch.equal(synthesize(model, seed=5), expected)


@pytest.mark.parametrize("offload, on_device", [
    ("none", {"model", "first_stage_model", *ENCODERS}),
    ("encoders", {"model", "first_stage_model"}),
    ("all", {"model"}),
])
def test_offloaded_parts_never_reach_the_device(offload, on_device):
    """The meta device stands in for a GPU: what load_for_serving moves there and what it leaves in CPU RAM."""
    model = load_for_serving("tiny", device="meta", offload=offload)
    for name, part in model.named_children():
        devices = {t.device.type for t in [*part.parameters(), *part.buffers()]}
        assert devices == ({"meta"} if name in on_device else {"cpu"}), name
    assert model.device.type == "meta"  # the schedule buffers moved: the sampler runs there


def test_compile_wraps_the_unet():
    # Only the wrapping is checked: compiling the tiny UNet's first forward takes about 3 minutes on 2 CPU cores.
    model = load_for_serving("tiny", device="cpu", dtype="bf16", compile=True)
    unet = model.model.diffusion_model
    assert type(unet).__name__ == "OptimizedModule"
    assert type(unet._orig_mod).__name__ == "UNetModel" and model.dtype == torch.bfloat16
    assert type(load_for_serving("tiny", device="cpu").model.diffusion_model).__name__ == "UNetModel"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"^offload 'gpu': expected one of none, encoders, all$"):
        load_for_serving("tiny", device="cpu", offload="gpu")
    with pytest.raises(ValueError, match=r"expected one of fp32, fp16, bf16"):
        load_for_serving("tiny", device="cpu", vae_dtype="fp8")


# ------------------------------------------------------------------------------------------- decode chunks
def test_decode_chunk_size_gives_the_default_video(tmp_path, monkeypatch):
    """The service's chunk reaches the VAE, and every chunk decodes the same video within float rounding."""
    runs = []

    def recording(*args, **kwargs):
        result = run_synthesis(*args, **kwargs)
        runs.append((kwargs["decode_chunk_size"], result.videos))
        return result

    monkeypatch.setattr(service_mod, "run_synthesis", recording)
    model = load_for_serving("tiny", device="cpu")
    Service(model, output_dir=tmp_path).generate(str(IMAGE), steps=2, seed=9)  # tiny's default: per frame
    for chunk in (2, 3, 4):
        Service(model, output_dir=tmp_path, decode_chunk_size=chunk).generate(str(IMAGE), steps=2, seed=9)
    assert [c for c, _ in runs] == [1, 2, 3, 4]
    default = runs[0][1]
    assert default.isfinite().all() and default.std() > 0.01
    for chunk, video in runs[1:]:
        torch.testing.assert_close(video, default, atol=1e-5, rtol=0, msg=f"chunk {chunk}")


def test_app_low_vram_from_the_environment_with_an_explicit_override(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import app

    monkeypatch.setenv("DC_APP_LOW_VRAM", "1")
    monkeypatch.setenv("DC_APP_CFG_MODE", "batched")
    args = app.parse_args(["--model", "tiny", "--device", "cpu"])
    assert (args.dtype, args.offload, args.decode_chunk_size, args.weights_dtype) == ("bf16", "all", 1, "int8")
    assert args.cfg_mode == "batched" and "cfg_mode" not in args.preset_options  # the environment's value wins
    assert str(args.ff_chunk_size) == "4096 tokens"
