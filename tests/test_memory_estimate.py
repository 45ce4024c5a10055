"""The memory estimate against counted bytes: weights against a real model's tensors, activations against the
peak of live bytes that torch.profiler's allocator events give for a real forward on CPU.

Why the profiler: it is an independent count (every allocation and free of the CPU allocator, in order),
where the estimate traces op outputs on a model that was never allocated (the meta device). RSS would be
noise at these sizes. Agreement asserted: UNet and VAE traces within 2 % (they agree to the byte here: the
profiler also sees kernel scratch, and the one large kind on CPU, oneDNN's conv reorders, is modelled);
whole runs within 5 % (the sampler's latents and the conditioning are counted by hand, not traced).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dc_app.loading import load_pretrained
from dc_app.memory_estimate import estimate_memory, free_memory
from dc_app.pipeline import decode_with_references, image_video, keyframe_video, run_synthesis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import model_config, random_model, unet_inputs  # noqa: E402


def allocator_peak(fn) -> int:
    """Peak of the running sum of the CPU allocator's events during fn() (bytes above what existed before)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # frees are negative
        peak = max(peak, live)
    return peak


def tensor_bytes(model) -> int:
    """Bytes of a real model's parameters and buffers (shared storages once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Counts do not depend on it, time does: two OpenMP threads on this shared 2-core machine ran a tiny
    # generation 100x slower than one (spinning on a descheduled sibling).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("tiny", device="cpu")


def close(estimated: int, counted: int, rel: float) -> bool:
    return abs(estimated - counted) <= rel * counted


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_are_the_real_models_bytes(dtype):
    model = load_pretrained("tiny", device="cpu", dtype=dtype)
    estimate = estimate_memory("tiny", dtype=dtype, device_type="cpu")
    assert estimate.weights == tensor_bytes(model)
    state_dict = sum(t.nbytes for t in model.state_dict().values())
    assert estimate.weights >= state_dict  # plus the non-persistent CLIP buffers


def test_unet_activations_match_the_allocator_tiny(tiny):
    x, t, cond, fs = unet_inputs(tiny, 2, tiny.temporal_length, torch.device("cpu"))
    counted = allocator_peak(lambda: tiny.apply_model(x, t, cond, fs=fs))
    low, high = estimate_memory("tiny", device_type="cpu").unet_activations
    assert close(low, counted, 0.02), (low, counted)
    assert high > low


def _reduced(frames: int):
    """The 512 layout at model_channels 64, trained length `frames` (the UNet and the Resampler agree)."""
    cfg = model_config("512", 64)
    cfg.model.params.unet_config.params.temporal_length = frames
    cfg.model.params.image_proj_stage_config.params.video_length = frames
    return cfg


def test_unet_activations_match_the_allocator_reduced_width():
    cfg = _reduced(2)
    model = random_model(cfg, torch.device("cpu"), unet_only=True)
    x, t, cond, fs = unet_inputs(model, 1, 2, torch.device("cpu"))
    counted = allocator_peak(lambda: model.apply_model(x, t, cond, fs=fs))
    low = estimate_memory(cfg, cfg_mode="two-call", device_type="cpu").unet_activations[0]
    assert close(low, counted, 0.02), (low, counted)

    # Chunking lowers the estimate as it lowers the counted peak.
    model.set_ff_chunk_size(tokens=1024)
    chunked = allocator_peak(lambda: model.apply_model(x, t, cond, fs=fs))
    low_chunked = estimate_memory(cfg, cfg_mode="two-call", device_type="cpu", ff_chunk_size=1024).unet_activations[0]
    assert chunked < 0.8 * counted
    assert close(low_chunked, chunked, 0.02), (low_chunked, chunked)


def test_decode_matches_the_allocator(tiny):
    h, w = tiny.image_size
    z = torch.randn(1, 4, 8, h, w)
    counted = allocator_peak(lambda: torch.stack([tiny.decode_first_stage(z, chunk_size=2)], 1))
    low = estimate_memory("tiny", frames=8, decode_chunk_size=2, device_type="cpu").vae_decode[0]
    assert close(low, counted, 0.02), (low, counted)


@pytest.mark.parametrize("name", ["tiny", "tooncrafter_tiny"])
def test_whole_run_matches_the_allocator(name):
    model = load_pretrained(name, device="cpu")
    h, w = model.image_size
    T = model.temporal_length
    interp = model.temporal_decoder
    image = torch.rand(3, 8 * h, 8 * w) * 2 - 1
    video = keyframe_video(image, image, T) if interp else image_video(image, T)
    counted = allocator_peak(lambda: run_synthesis(
        model, "fixed", ["a cat"], video, (1, 4, T, h, w), ddim_steps=2, unconditional_guidance_scale=7.5,
        guidance_rescale=0.7, timestep_spacing="uniform_trailing", interp=interp))
    estimate = estimate_memory(name, device_type="cpu")
    low = estimate.total[0] - estimate.weights
    assert close(low, counted, 0.05), (low, counted, estimate.peak_phase)
    if interp:  # ToonCrafter: its temporal decoder on 4 frames at once is the peak
        assert estimate.peak_phase == "decode"


def test_more_frames_keep_the_unet_flat_and_grow_the_rest():
    short, long = (estimate_memory("tiny", frames=n, device_type="cpu") for n in (4, 32))
    assert long.unet_activations == short.unet_activations
    assert long.weights == short.weights
    assert long.sampler_state > short.sampler_state
    assert long.vae_decode[0] > short.vae_decode[0]
    assert long.total[0] > short.total[0]
    with pytest.raises(ValueError, match="frames"):
        estimate_memory("tiny", frames=33)


def test_offload_removes_encoder_and_vae_weights(tiny):
    parts = {name: tensor_bytes(part) for name, part in tiny.named_children()}
    schedule = sum(b.nbytes for b in tiny.buffers(recurse=False))
    denoise = {mode: dict((p.name, p) for p in estimate_memory("tiny", offload=mode).phases)["denoise"]
               for mode in ("none", "encoders", "all")}
    everything = sum(parts.values()) + schedule
    encoders = parts["cond_stage_model"] + parts["embedder"] + parts["image_proj_model"]
    assert denoise["none"].weights == everything
    assert denoise["encoders"].weights == everything - encoders
    assert denoise["all"].weights == parts["model"] + schedule
    # On CPU the offloaded parts stay in the RAM being estimated.
    assert estimate_memory("tiny", offload="all", device_type="cpu").weights == everything


def test_cuda_high_end_adds_the_context_and_describe_says_it():
    cpu, cuda = estimate_memory("tiny", device_type="cpu"), estimate_memory("tiny", device_type="cuda")
    assert cuda.total[1] - cuda.total[0] > 0.25 * 2**30
    assert cpu.total[0] <= cpu.total[1] < cpu.total[0] * 1.5
    text = cuda.describe()
    assert text.startswith("needs about") and "weights" in text and "UNet activations" in text


def test_half_precision_halves_the_unet_trace_of_the_full_size_1024_model():
    # Meta device only: nothing is allocated. Also a check that the full-size trace stays cheap enough to run.
    fp32 = estimate_memory("1024", dtype="fp32", vae_dtype="fp32")
    bf16 = estimate_memory("1024", dtype="bf16", vae_dtype="fp32")
    assert 0.45 < bf16.unet_activations[0] / fp32.unet_activations[0] < 0.55
    assert bf16.vae_decode == fp32.vae_decode
    assert bf16.peak_phase == "denoise"


def test_free_memory_on_cpu_is_positive():
    assert 0 < free_memory("cpu") < 2**50


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_weights_are_the_real_models_bytes(kind):
    from dc_app.loading import load_for_serving

    model = load_for_serving("tiny", device="cpu", dtype="bf16", weights_dtype=kind)
    estimate = estimate_memory("tiny", dtype="bf16", weights_dtype=kind, device_type="cpu")
    assert estimate.weights == tensor_bytes(model)
    plain = estimate_memory("tiny", dtype="bf16", device_type="cpu").weights
    assert estimate.weights < plain
