"""Will it fit? The peak memory of a generation, predicted from the model's config and the options, as a range.

A generation has three phases, and its peak is the largest of them:
* encode, once: the text encoder (prompt and empty prompt), the image encoder and Resampler, the VAE encoder
  on the conditioning frame(s);
* denoise, per step: the UNet on windows of T frames (the model's temporal_length) at batch 2 (batched CFG) or
  1 (two calls). Its activations do not grow with the step count, nor with the frame count N: longer videos
  run more windows of the same size (dc_app/windows.py). Only the sampler's N-frame latents grow with N;
* decode, at the end: the VAE on chunks of frames (`decode_chunk_size`, else one frame for a perframe_ae model;
  ToonCrafter's temporal decoder always takes T frames), while the N-frame video accumulates.

Each phase is weights resident on the device then + activations. Weights are exact: the bytes of the
parameters and buffers of those parts, in their dtypes. Activations are traced, not guessed: the same
forward runs on a model built on the meta device under `MemoryTrace` (dc_app/memory_trace.py), which adds up
the live bytes of every op output without allocating any (a full-size 1024 UNet traces in well under a
second). That is the low end. The high end adds what a trace cannot see; the margins are defined below with
their reasons. Traces are cached, so the UI can ask again on every change of frames or options.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import torch
from omegaconf import DictConfig, OmegaConf

from .loading.build import build_model, parse_dtype
from .loading.spec import ModelSpec, load_model_config, model_spec
from .memory_trace import DEVICE_TYPES, MemoryTrace
from .models.weight_storage import store_weights_8bit

GiB = 2**30
# One estimate at a time: the traces set options on the cached meta models (the UI's line and a request's check
# may ask together, from two threads).
_TRACING = threading.Lock()
CFG_MODES = ("batched", "two-call")
OFFLOAD_MODES = ("none", "encoders", "all")  # as dc_app.options.OFFLOAD_MODES
WEIGHTS_DTYPES = (None, "fp8", "int8")
PHASES = ("encode", "denoise", "decode")
ENCODER_PARTS = ("cond_stage_model", "embedder", "image_proj_model")

# ---- What a trace cannot see, and the margins the high end adds for it --------------------------------
# CUDA: the caching allocator rounds every block up (512 B, and carves large blocks out of 2 MiB / 20 MiB
# segments whose tails it cannot always reuse: fragmentation is commonly 10-30 % of the activations), cuDNN
# picks conv algorithms with workspaces of up to a few hundred MB, and SDPA's kernels keep small internal
# buffers. 35 % on activations covers these; the weights are allocated once, so they get no margin.
CUDA_ACTIVATION_MARGIN = 0.35
# The CUDA context (driver, kernels, cuBLAS/cuDNN handles): 0.3-0.5 GB, outside torch's allocator, so outside
# torch.cuda.max_memory_allocated too. Only the high end counts it: a process that has already made its
# context reads it as used in mem_get_info.
CUDA_CONTEXT_BYTES = GiB // 2
# CPU: glibc malloc serves large tensors with mmap (no fragmentation, freed at once) and small ones from its
# heaps; oneDNN convolutions and the flash attention kernel keep per-thread scratch buffers. Measured here
# (benchmarks/low_memory.py, reduced width) the peak RSS increment stays within 15 % of weights + traced
# activations; 25 % leaves room for more threads.
CPU_ACTIVATION_MARGIN = 0.25
# CPU, bf16: a buffer of 70-75 MiB that no op output accounts for, the same at 2 and 16 frames and with or
# without chunking (benchmarks/low_memory.py, torch.profiler): a fixed cost of the bf16 CPU kernels, not of
# the activations, so it is added to the high end as a constant rather than as a share.
CPU_BF16_KERNEL_BYTES = 80 * 2**20


@dataclass(frozen=True)
class PhaseEstimate:
    name: str          # encode | denoise | decode
    weights: int       # bytes of the parameters and buffers on the device during this phase
    activations: tuple[int, int]  # (low, high) bytes above the weights

    @property
    def total(self) -> tuple[int, int]:
        return self.weights + self.activations[0], self.weights + self.activations[1]


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one generation, in bytes; ranges are (low, high)."""

    weights: int                        # resident at the peak phase, exact
    unet_activations: tuple[int, int]   # one UNet call (one window of T frames); flat in the frame count
    sampler_state: int                  # N-frame latents and conditioning held while the UNet runs; grows with N
    vae_decode: tuple[int, int]         # decode activations of one chunk plus the N-frame video; grows with N
    encode: tuple[int, int]             # the largest encoder's activations
    total: tuple[int, int]              # the peak phase's weights + activations (+ CUDA context, high end)
    peak_phase: str                     # encode | denoise | decode
    phases: tuple[PhaseEstimate, ...]
    device_type: str

    def describe(self) -> str:
        """One sentence in plain words, e.g. for the UI next to Generate."""
        unet = (self.unet_activations[0] + self.sampler_state, self.unet_activations[1] + self.sampler_state)
        context = " (with the CUDA context)" if self.device_type == "cuda" else ""
        return (f"needs about {size_span(*self.total)}{context}, at its peak during {self.peak_phase}: weights "
                f"{size(self.weights)}, UNet activations {size_span(*unet)}, VAE decode {size_span(*self.vae_decode)}")


def size(n: int) -> str:
    """Bytes in words: '6.1 GiB', or '25 MiB' below a GiB (the tiny models)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def size_span(low: int, high: int) -> str:
    """'6.1-7.4 GiB', '47-48 MiB', '900 MiB-1.2 GiB'."""
    (a, unit_a), b = size(low).split(), size(high)
    return f"{a}-{b}" if b.endswith(unit_a) else f"{a} {unit_a}-{b}"


def estimate_memory(
    spec_or_cfg: Union[str, Path, ModelSpec, DictConfig],
    *,
    frames: int | None = None,
    dtype: str = "fp32",
    vae_dtype: str = "fp32",
    weights_dtype: str | None = None,
    ff_chunk_size: int | None = None,
    ff_chunk_budget: int | None = None,
    cfg_mode: str = "batched",
    decode_chunk_size: int | None = None,
    offload: str = "none",
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Predict the peak memory of one generation (batch 1, one sample).

    `spec_or_cfg`: a model name, a yaml path, a ModelSpec, or a loaded config; the architecture comes from the
    config, never from the name. `frames`: N, default the model's T. `dtype`/`vae_dtype`: "fp32" | "fp16" |
    "bf16". `weights_dtype`: None, "fp8" or "int8" (UNet weights stored in 8 bits). `ff_chunk_size` (tokens) or
    `ff_chunk_budget` (bytes): what DynamiCrafter.set_ff_chunk_size takes. `cfg_mode`: "batched" (one UNet call
    at batch 2) or "two-call". `offload`: "none" | "encoders" | "all" (no effect on CPU, where the "device" is
    the RAM they are kept in). `device_type`: "cuda" | "cpu", which sets the attention kernel traced and the
    margins of the high end.
    """
    key = _config_key(spec_or_cfg)
    for name, value, allowed in (("cfg_mode", cfg_mode, CFG_MODES), ("offload", offload, OFFLOAD_MODES),
                                 ("weights_dtype", weights_dtype, WEIGHTS_DTYPES),
                                 ("device_type", device_type, DEVICE_TYPES)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: expected one of {allowed}")
    dtype, vae_dtype = _dtype_key(dtype), _dtype_key(vae_dtype)
    with _TRACING:
        return _estimate(key, frames, dtype, vae_dtype, weights_dtype, ff_chunk_size, ff_chunk_budget, cfg_mode,
                         decode_chunk_size, offload, device_type)


def weight_bytes(spec_or_cfg, *, dtype: str = "fp32", vae_dtype: str = "fp32",
                 weights_dtype: str | None = None) -> dict[str, int]:
    """Bytes of each part's parameters and buffers ("model" is the UNet; "schedule" the DDPM buffers), exact,
    from a meta build with these dtypes."""
    key = _config_key(spec_or_cfg)
    return dict(_part_bytes((key, _dtype_key(dtype), _dtype_key(vae_dtype), weights_dtype)))


def free_memory(device: Union[str, torch.device]) -> int:
    """Bytes free for a generation: torch.cuda.mem_get_info on a GPU; MemAvailable (/proc/meminfo) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


# ------------------------------------------------------------------------------------------------ internals
def _config_key(spec_or_cfg) -> str:
    """A hashable stand-in for the config: a model name as it is, anything else as its yaml text."""
    if isinstance(spec_or_cfg, ModelSpec):
        spec_or_cfg = spec_or_cfg.name
    if isinstance(spec_or_cfg, DictConfig):
        return OmegaConf.to_yaml(spec_or_cfg)
    load_model_config(spec_or_cfg)  # fails early, with its message, on an unknown name or path
    return str(spec_or_cfg)


def _config(key: str) -> DictConfig:
    return load_model_config(key) if "\n" not in key else OmegaConf.create(key)


def _dtype_key(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[parse_dtype(dtype)]


@lru_cache(maxsize=64)
def _estimate(key, frames, dtype, vae_dtype, weights_dtype, ff_chunk_size, ff_chunk_budget, cfg_mode,
              decode_chunk_size, offload, device_type) -> MemoryEstimate:
    cfg = _config(key)
    spec = model_spec(cfg)
    T = spec.frames
    N = T if frames is None else int(frames)
    lo, hi = spec.defaults.frames_range
    if not lo <= N <= hi:
        raise ValueError(f"frames={N}: model {spec.name} makes {lo} to {hi} frames")
    model_key = (key, dtype, vae_dtype, weights_dtype)  # one meta model serves every trace of this estimate
    parts = _part_bytes(model_key)
    enc = _encode_trace(model_key, device_type)
    batch = 2 if cfg_mode == "batched" else 1
    unet = _unet_trace(model_key, ff_chunk_size, ff_chunk_budget, batch, device_type)
    margin = CUDA_ACTIVATION_MARGIN if device_type == "cuda" else CPU_ACTIVATION_MARGIN
    fixed = CPU_BF16_KERNEL_BYTES if device_type == "cpu" and dtype == "bf16" else 0

    def span(low: int) -> tuple[int, int]:
        return low, int(low * (1 + margin)) + fixed

    # Which parts are on the device in each step. Offloaded parts visit it only while they run; on CPU they
    # never leave the RAM that is being estimated.
    off = set() if (device_type == "cpu" or offload == "none") else set(ENCODER_PARTS)
    if offload == "all" and device_type != "cpu":
        off.add("first_stage_model")

    def resident(*visiting: str) -> int:
        return sum(b for name, b in parts.items() if name not in off or name in visiting)

    h, w = spec.latent_size
    latent = 4 * N * h * w * 4  # one float32 (1, 4, N, h, w) latent
    held = _conditioning_bytes(model_key, cfg_mode)  # alive from the encoders to the end of the run
    state = latent * _latent_copies(cfg_mode, N > T) + held
    encode_steps = [PhaseEstimate("encode", resident(*names), span(act)) for names, act in enc]
    denoise = PhaseEstimate("denoise", resident(), span(unet + state))
    vae = span(_decode_bytes(model_key, spec, N, decode_chunk_size, device_type))
    decode = PhaseEstimate("decode", resident("first_stage_model"), (vae[0] + latent + held, vae[1] + latent + held))
    encode = max(encode_steps, key=lambda p: p.total[1])
    phases = (encode, denoise, decode)
    peak = max(phases, key=lambda p: p.total[1])
    context = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0
    total = (max(p.total[0] for p in phases), peak.total[1] + context)
    return MemoryEstimate(weights=peak.weights, unet_activations=span(unet), sampler_state=state, vae_decode=vae,
                          encode=encode.activations, total=total, peak_phase=peak.name, phases=phases,
                          device_type=device_type)


def _latent_copies(cfg_mode: str, windowed: bool) -> int:
    """How many float32 (1, 4, N, h, w) latents the sampler holds while the UNet runs (dc_app/sampling.py,
    guidance.py, windowed_model.py, pipeline.py): the concat conditioning and the current x (2), the first
    step's x_prev and pred_x0 kept as intermediates (2); batched CFG doubles x and the conditioning for the call
    (+4) and, windowed, accumulates a batch-2 fused output (+2); two calls hold the first call's output
    (+1) and, windowed, a batch-1 fused output (+1). The T-frame window inputs are inside the UNet trace."""
    if cfg_mode == "batched":
        return 8 + (2 if windowed else 0)
    return 5 + (1 if windowed else 0)


# -- the meta model and what is traced on it (cached: the UI asks again on every change) -------------------
@lru_cache(maxsize=4)
def _meta_model(model_key: tuple):
    """The model on meta for (config key, dtype, vae_dtype, weights_dtype): built once (about 2 s for the 1024
    model, CLIP included; nothing is allocated)."""
    key, dtype, vae_dtype, weights_dtype = model_key
    model = build_model(_config(key), device="meta")
    model.set_dtype(parse_dtype(dtype), parse_dtype(vae_dtype))
    if weights_dtype is not None:
        # The fp8 probe needs real memory: run it on the CPU (a GPU without fp8 is refused when the model loads).
        store_weights_8bit(model.model.diffusion_model, weights_dtype, device="cpu")
    return model


def tensor_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage once (meta tensors count their size too)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata  # tied or shared tensors count once
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@lru_cache(maxsize=16)
def _part_bytes(model_key: tuple) -> dict[str, int]:
    """Bytes of each part's parameters and buffers (the schedule, on the model itself, as "schedule")."""
    model = _meta_model(model_key)
    parts = {name: tensor_bytes([*part.parameters(), *part.buffers()]) for name, part in model.named_children()}
    parts["schedule"] = tensor_bytes(model.buffers(recurse=False))
    return parts


@lru_cache(maxsize=32)
def _unet_trace(model_key: tuple, ff_chunk_size, ff_chunk_budget, batch: int, device_type: str) -> int:
    """Peak live bytes of one apply_model call on a window of T frames at `batch`, its float32 inputs aside."""
    model = _meta_model(model_key)
    model.set_ff_chunk_size(tokens=ff_chunk_size, budget_bytes=ff_chunk_budget)
    p = model.config.model.params
    h, w = model.image_size
    T = model.temporal_length
    context_dim = int(p.unet_config.params.context_dim)
    resampler = p.image_proj_stage_config.params
    # The Resampler gives num_queries tokens per frame of its video_length (dc_app/models/resampler.py).
    tokens = int(resampler.num_queries) * int(resampler.get("video_length") or 1)
    meta = torch.device("meta")
    x = torch.empty(batch, 4, T, h, w, device=meta)
    cond = {"c_concat": [torch.empty(batch, 4, T, h, w, device=meta)],
            "c_crossattn": [torch.empty(batch, 77 + tokens, context_dim, device=meta)]}
    t = torch.zeros(batch, dtype=torch.long, device=meta)
    try:
        with torch.no_grad(), MemoryTrace(device_type) as trace:
            model.apply_model(x, t, cond, fs=t)
    finally:
        model.set_ff_chunk_size()  # the cached meta model serves other traces
    return trace.peak


@lru_cache(maxsize=16)
def _conditioning_bytes(model_key: tuple, cfg_mode: str) -> int:
    """What the encoders' outputs keep alive for the whole run: the cond and uncond contexts (batched CFG also
    holds their concatenation) and, for a temporal decoder, the keyframes' reference features."""
    model = _meta_model(model_key)
    p = model.config.model.params
    resampler = p.image_proj_stage_config.params
    tokens = 77 + int(resampler.num_queries) * int(resampler.get("video_length") or 1)
    context = tokens * int(p.unet_config.params.context_dim) * 4  # float32 (1, 77 + image tokens, d)
    total = context * (4 if cfg_mode == "batched" else 2)
    if model.temporal_decoder:
        H, W = (8 * s for s in model.image_size)
        with torch.no_grad():
            total += tensor_bytes(model.encode_keyframes(torch.empty(1, 3, 2, H, W, device="meta"))[1])
    return total


@lru_cache(maxsize=16)
def _encode_trace(model_key: tuple, device_type: str) -> tuple:
    """((parts on the device, peak live bytes), ...) of each encoder step, as run_synthesis runs them."""
    model = _meta_model(model_key)
    H, W = (8 * s for s in model.image_size)
    spec = model_spec(model.config)
    # Interpolation models and temporal decoders encode the first and the last frame; i2v the first only.
    frames = 2 if (spec.interp or model.temporal_decoder) else 1
    video = torch.empty(1, 3, frames, H, W, device="meta")
    steps = []
    for parts, run in (
        (("first_stage_model",), lambda: (model.encode_keyframes(video) if model.temporal_decoder
                                          else model.encode_first_stage(video))),
        (("cond_stage_model",), lambda: model.get_learned_conditioning([""])),
        (("embedder", "image_proj_model"), lambda: model.encode_image_tokens(video[:, :, 0])),
    ):
        with torch.no_grad(), MemoryTrace(device_type) as trace:
            run()
        steps.append((parts, trace.peak))
    return tuple(steps)


@lru_cache(maxsize=32)
def _decode_chunk_trace(model_key: tuple, chunk: int, device_type: str) -> int:
    """Peak live bytes of the VAE decoding `chunk` frames (a temporal decoder: with its references)."""
    model = _meta_model(model_key)
    h, w = model.image_size
    meta = torch.device("meta")
    z = torch.empty(chunk, 4, h, w, device=meta, dtype=model.vae_dtype)
    vae = model.first_stage_model
    with torch.no_grad():
        if model.temporal_decoder:
            video = torch.empty(1, 3, 2, 8 * h, 8 * w, device=meta)
            references = [r.to(model.vae_dtype) for r in model.encode_keyframes(video)[1]]
            with MemoryTrace(device_type) as trace:
                vae.decode(z, num_frames=chunk, references=references)
        else:
            with MemoryTrace(device_type) as trace:
                vae.decode(z)
    return trace.peak


def _decode_bytes(model_key: tuple, spec: ModelSpec, frames: int, decode_chunk_size: int | None,
                  device_type: str) -> int:
    """Live bytes of the decode phase above the weights and the sampled latents: the N-frame input cast to the
    VAE's dtype, the pixels decoded so far, and one chunk's activations; then the concatenation, which holds
    the video twice (the chunks and their concatenation; run_synthesis's stack of the samples again)."""
    T = spec.frames
    temporal = _meta_model(model_key).temporal_decoder
    if temporal:
        chunk = T  # the temporal decoder's chunk is fixed by the model
    else:
        chunk = min(decode_chunk_size or (1 if spec.defaults.perframe_ae else frames), frames)
    h, w = spec.latent_size
    H, W = spec.frame_size
    vae_itemsize = parse_dtype(model_key[2]).itemsize
    pixels = 3 * frames * H * W * 4  # the float32 video (1, 3, N, H, W)
    vae_input = 4 * frames * h * w * vae_itemsize
    # ToonCrafter's middle-frame fix-up decodes again while the first decode's video is held (pipeline.py).
    held = pixels if temporal else pixels * (frames - chunk) // frames
    chunk_peak = _decode_chunk_trace(model_key, chunk, device_type)
    return vae_input + max(held + chunk_peak, 2 * pixels)
