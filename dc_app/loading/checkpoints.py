"""Where official checkpoints come from and how they are read: safely, strictly, without two copies in RAM.

Order of lookup for a model (its yaml's `weights:` block, read into a `ModelSpec`):
1. an explicit path;
2. `weights.local_checkpoint` under checkpoints/ (upstream's layout, e.g. `dynamicrafter_512_v1/model.ckpt`),
   used as it is;
3. `weights.hub_file` of `weights.hub_repo` through `huggingface_hub` (Hugging Face cache, `HF_HOME`,
   `HF_HUB_OFFLINE` honoured).

Files are read with `torch.load(weights_only=True, mmap=True)`: no pickle code runs, and tensors stay
backed by the file until `load_state_dict(assign=True)` adopts them.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .spec import ModelSpec

PROJECT_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"

# DeepSpeed checkpoints wrap every key in this prefix (upstream strips its 16 characters).
DEEPSPEED_PREFIX = "_forward_module."
# The 256 model's fs-embedding MLP has an older name in its file; upstream renames it after a failed strict load.
RENAMED_KEYS = {"framestride_embed": "fps_embedding"}

# Training metadata that may sit next to the weights (Lightning/omegaconf/argparse/pathlib objects).
# weights_only refuses them; dc_app maps exactly these names onto an inert placeholder, so no code from
# those packages runs and the tensors still load. Anything else (os.system, eval, ...) stays refused.
_METADATA_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "argparse.", "pathlib.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model. The message names the file."""


class _InertMetadata:
    """Stands in for refused metadata classes: accepts any state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def local_checkpoint_path(spec: ModelSpec, root: Path | str | None = None) -> Path | None:
    """Where the spec's local checkpoint would be (root: $DC_APP_CHECKPOINTS, else checkpoints/); None without one.

    The path comes from the yaml (`weights.local_checkpoint`), in upstream's own layout, e.g.
    `dynamicrafter_512_v1/model.ckpt` or ToonCrafter's `tooncrafter_512_interp_v1/model.ckpt`.
    """
    if not spec.local_checkpoint:
        return None
    root = Path(root or os.environ.get("DC_APP_CHECKPOINTS") or PROJECT_CHECKPOINTS)
    return root / spec.local_checkpoint


def resolve_checkpoint(spec: ModelSpec, root: Path | str | None = None) -> Path:
    """Find the spec's checkpoint locally or download it from its Hub repo into the Hugging Face cache."""
    local = local_checkpoint_path(spec, root)
    if local is not None and local.is_file():
        return local
    if not spec.hub_repo:
        raise CheckpointError(f"model {spec.name!r} has no Hub repo and no local checkpoint at {local}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=spec.hub_repo, filename=spec.hub_file))
    except LocalEntryNotFoundError as err:
        where = f", or place the file at {local}" if local is not None else ""
        raise CheckpointError(
            f"{spec.hub_repo}/{spec.hub_file} is not in the Hugging Face cache ({_hf_home()}) and cannot be "
            f"downloaded now ({err.__class__.__name__}). Connect to the internet or unset HF_HUB_OFFLINE{where}."
        ) from err


def download_progress(hub_repo: str, cache_dir: Path | str | None = None) -> int | None:
    """Bytes written so far by a running Hugging Face download of `hub_repo` (its largest `*.incomplete` blob in
    the cache), or None when no download of that repo is in progress."""
    if cache_dir is None:
        cache_dir = _hf_home()
    blobs = Path(cache_dir) / f"models--{hub_repo.replace('/', '--')}" / "blobs"
    sizes = []
    for part in blobs.glob("*.incomplete"):
        try:
            sizes.append(part.stat().st_size)
        except OSError:  # finished (renamed) between the listing and the stat
            pass
    return max(sizes) if sizes else None


def _hf_home() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state_dict (keys as the model names them), never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return normalize_state_dict(load_file(str(path)), path)
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err}); download it again") from err
    return normalize_state_dict(_safe_torch_load(path), path)


def _safe_torch_load(path: Path):
    if not zipfile.is_zipfile(path):
        # Every torch.save since 1.6 writes a zip archive; a cut-off download loses the central directory.
        raise CheckpointError(
            f"checkpoint {path} is not a complete torch zip archive (truncated or corrupt download?); "
            f"delete it and download it again"
        )
    try:
        return _load_weights_only(path)
    except pickle.UnpicklingError as err:
        needed = _unsafe_globals(path)
        metadata = [n for n in needed if n.startswith(_METADATA_PREFIXES)]
        if needed and len(metadata) == len(needed):
            with torch.serialization.safe_globals([(_InertMetadata, n) for n in metadata]):
                return _load_weights_only(path)
        raise CheckpointError(
            f"checkpoint {path} was refused: loading it would run code or build objects dc_app does not allow "
            f"({', '.join(needed) or err}). Use the official file from the Hub."
        ) from err
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err}); delete it and download it again") from err


def _load_weights_only(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def normalize_state_dict(obj, path: Path | str = "<memory>") -> dict[str, torch.Tensor]:
    """Accept upstream's layouts: `{"state_dict": sd}`, DeepSpeed `{"module": sd}` (prefixed), or a bare sd."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = dict(obj["state_dict"])
    elif isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
        sd = {k[len(DEEPSPEED_PREFIX):] if k.startswith(DEEPSPEED_PREFIX) else k: v for k, v in obj["module"].items()}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        raise CheckpointError(f"checkpoint {path} holds no state_dict (expected 'state_dict' or 'module' entries)")
    return {_rename(k): v for k, v in sd.items()}


def _rename(key: str) -> str:
    for old, new in RENAMED_KEYS.items():
        key = key.replace(old, new)
    return key


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """Raise a CheckpointError naming the file unless the keys and shapes are exactly the model's."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model config: {'; '.join(problems)}. "
            f"Is it the checkpoint of another model size?"
        )
