"""dc_app: DynamiCrafter image-to-video with a DDIM sampler that never yields NaN.

Public API::

    from dc_app import load_model_config, build_model, load_pretrained, load_for_serving
"""
from __future__ import annotations

__version__ = "0.1.0"

from .loading.spec import load_model_config

__all__ = ["load_model_config", "build_model", "load_pretrained", "load_for_serving", "__version__"]


def __getattr__(name):
    # torch and the model code load only when a model is asked for (keeps `python -m dc_app --help` quick).
    if name in ("build_model", "load_pretrained", "load_for_serving"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'dc_app' has no attribute {name!r}")
