"""Build a DynamiCrafter model from a config and fill it with official (or seeded random) weights."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from omegaconf import DictConfig

from .checkpoints import check_keys, read_checkpoint, resolve_checkpoint
from .spec import load_model_config, model_spec
from ..models.token_chunking import parse_token_chunking
from ..models.weight_storage import check_weight_storage, store_weights_8bit
from ..options import OFFLOAD_MODES

TORCH_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (or a torch.dtype) -> torch.dtype; None -> float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    try:
        return TORCH_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16': the spelling --dtype takes, so a sidecar's value can be passed back."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_config(cfg: Union[DictConfig, str, Path]) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else load_model_config(cfg)


def build_model(cfg: Union[DictConfig, str, Path], device: Union[str, torch.device, None] = None):
    """A DynamiCrafter nn.Module in eval mode, float32, whose state_dict keys equal the checkpoint's.

    `device="meta"` allocates nothing (for inspecting shapes, or for loading with assign=True).
    """
    from ..models.diffusion import DynamiCrafter

    cfg = _as_config(cfg)
    with torch.device(device or "cpu"):
        model = DynamiCrafter(cfg)
    return model.eval().requires_grad_(False)


def load_pretrained(
    name: Union[str, Path] = "512",
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    checkpoint: Union[str, Path, None] = None,
    vae_dtype: Union[str, torch.dtype, None] = None,
):
    """Download (if needed) and strictly load a model; test models (`weights.random_seed` in their yaml) get
    seeded random weights instead.

    The model is built on the meta device and adopts the checkpoint's (memory-mapped) tensors with
    `load_state_dict(assign=True)`, so the weights are never held twice in RAM.
    """
    cfg = _as_config(name)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype)
    spec = None if checkpoint is not None else model_spec(cfg)
    if spec is not None and spec.random_weights:
        from ..models.random_init import randomize_parameters

        model = randomize_parameters(build_model(cfg, device="cpu"), seed=spec.random_seed)
    else:
        path = Path(checkpoint) if checkpoint else resolve_checkpoint(spec)
        state_dict = read_checkpoint(path)
        model = build_model(cfg, device="meta")
        check_keys(model, state_dict, path)
        model.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        # Checkpoint tensors may be stored in half precision; the model's reference dtype is float32.
        model.float()
        model.reset_nonpersistent_buffers("cpu")
    model = model.to(device)
    if dtype != torch.float32 or vae_dtype is not None:
        model.set_dtype(dtype, parse_dtype(vae_dtype))
    return model.eval().requires_grad_(False)


def load_for_serving(
    name: Union[str, Path] = "512",
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    vae_dtype: Union[str, torch.dtype, None] = "fp32",
    offload: str = "none",
    compile: bool = False,
    checkpoint: Union[str, Path, None] = None,
    weights_dtype: str | None = None,
    ff_chunk_size=None,
):
    """The model as app.py and `python -m dc_app` serve it, every performance option applied here and only here.

    `dtype`: the UNet, CLIP and Resampler; `vae_dtype`: the VAE (float32 unless asked: fp16 VAE decode is a
    known cause of black videos). The schedule buffers stay float32 whatever the precision.
    `offload`: "none"; "encoders" keeps the text and image encoders in CPU RAM, on the device only while they run
    (once per request); "all" does the same with the VAE. `compile`: torch.compile the UNet.
    `weights_dtype`: "fp8" or "int8" stores the UNet's Linear and conv weights in 8 bits, upcast per layer to
    `dtype` at use (None: as `dtype`). `ff_chunk_size`: a TokenChunking, or its text ("4096", "64MiB"): the UNet's
    transformer blocks run over chunks of tokens (None: all at once).
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload {offload!r}: expected one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device) if device is not None else default_device()
    # Cast on the CPU, then move: the device never holds a float32 copy of half-precision weights, and the
    # offloaded parts never reach it at all (the load's peak is then the serving peak, not above it).
    if weights_dtype is not None:
        check_weight_storage(weights_dtype, device)  # before the minutes of loading, not after
    model = load_pretrained(name, device="cpu", dtype=dtype, checkpoint=checkpoint, vae_dtype=vae_dtype)
    if weights_dtype is not None:
        # On the CPU, layer by layer: the device only ever receives the 8-bit weights.
        store_weights_8bit(model.model.diffusion_model, weights_dtype)
    if ff_chunk_size is not None:
        chunking = parse_token_chunking(ff_chunk_size)
        model.set_ff_chunk_size(tokens=chunking.tokens, budget_bytes=chunking.budget_bytes)
    if offload != "none":
        model.enable_offload(vae=offload == "all")
    _place(model, device, keep_on_cpu=model.offloaded)
    if compile:
        model.compile_unet()
    return model


def offload_mode(model) -> str:
    """What `load_for_serving(offload=...)` (or `enable_offload`) set on `model`: none, encoders or all."""
    parts = frozenset(getattr(model, "offloaded", ()))
    if not parts:
        return "none"
    return "all" if "first_stage_model" in parts else "encoders"


def _place(model, device: torch.device, keep_on_cpu: frozenset) -> None:
    """`model.to(device)`, except the parts named in `keep_on_cpu`."""
    if next(model.parameters(recurse=False), None) is not None:
        raise ValueError("the model has parameters of its own; _place moves only its parts and buffers")
    for part_name, part in model.named_children():
        part.to("cpu" if part_name in keep_on_cpu else device)
    # The schedule buffers live on the model itself; model.device is where they are.
    for buffer_name, buffer in list(model.named_buffers(recurse=False)):
        setattr(model, buffer_name, buffer.to(device))
