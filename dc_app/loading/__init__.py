"""Everything about getting a model: what its yaml says, where its weights come from, building and loading it.

* `spec`: the yaml configs (upstream's schema) and `ModelSpec`, the one source of a model's defaults and
  weights' source;
* `checkpoints`: finding (local layout or Hugging Face Hub) and safely reading a checkpoint;
* `build`: building the nn.Module and loading it strictly, with the serving options (precision, offload,
  compile);
* `background`: loading in a thread while the page is up, with a status in plain words.
"""
from __future__ import annotations

from .background import ModelLoader, ModelNotReady
from .build import (
    TORCH_DTYPES,
    build_model,
    default_device,
    dtype_name,
    load_for_serving,
    load_pretrained,
    offload_mode,
    parse_dtype,
)
from .checkpoints import CheckpointError, local_checkpoint_path, read_checkpoint, resolve_checkpoint
from .spec import MODEL_NAMES, UPSTREAM_SPACINGS, ModelDefaults, ModelSpec, load_model_config, model_spec, spec_if_any

__all__ = [
    "MODEL_NAMES", "UPSTREAM_SPACINGS", "TORCH_DTYPES", "CheckpointError", "ModelDefaults", "ModelLoader",
    "ModelNotReady", "ModelSpec", "build_model", "default_device", "dtype_name", "load_for_serving",
    "load_model_config", "load_pretrained", "local_checkpoint_path", "model_spec", "offload_mode", "parse_dtype",
    "read_checkpoint", "resolve_checkpoint", "spec_if_any",
]
