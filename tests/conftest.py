"""Shared fixtures: the upstream reference data copied into tests/data (see tests/data/REFERENCE.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"
KEYS = DATA / "keys"

# Tolerances suggested by the reference README, section 5.
ATOL, RTOL = 1e-4, 1e-4
ATOL_LARGE_IMAGE = 5e-4
ATOL_SAMPLER = 1e-3


@pytest.fixture(scope="session")
def cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(TINY / "cases.safetensors"))


@pytest.fixture(scope="session")
def cases_meta() -> dict:
    return json.loads((TINY / "cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(TINY / "weights.safetensors"))


@pytest.fixture(scope="session")
def schedule_ref() -> dict:
    return json.loads((TINY / "schedule.json").read_text())


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows (key, shape, kind) of keys/dynamicrafter_<name>.tsv, in state_dict order."""
    return read_manifest_file(KEYS / f"dynamicrafter_{name}.tsv")


def read_manifest_file(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows (key, shape, kind) of a key manifest (header `key shape dtype kind`), in state_dict order."""
    rows = []
    lines = path.read_text().splitlines()[1:]
    for line in lines:
        key, shape, _dtype, kind = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        rows.append((key, dims, kind))
    return rows


def strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a full state_dict under `prefix`, with the prefix removed (one submodule's weights)."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def video_api(result):
    """A GenerationResult as /generate and /interpolate answer it: (mp4 path, report, seed used)."""
    return str(result.video), result.report(), result.seed


def compare_api(result):
    """A compare's GenerationResult as /compare answers it: (stock mp4 or None after a crash, fixed mp4, report)."""
    stock = result.stock.video
    return (str(stock) if stock is not None else None), str(result.video), result.report()


class ModelCall(NamedTuple):
    cond: dict       # the conditioning apply_model got (cloned)
    output: object   # what it returned (cloned)
    fs: object       # its fs argument


class Recorder:
    """Wraps a model's apply_model to record every call (conditioning, output, fs), and as a sampler callback
    every step's (i, n_steps, x_prev, pred_x0); for the parity tests against upstream's recorded runs."""

    def __init__(self, model):
        self.model, self.calls, self.steps = model, [], []
        self._apply = model.apply_model

    def __enter__(self):
        def apply_model(x, t, cond, **kw):
            out = self._apply(x, t, cond, **kw)
            self.calls.append(ModelCall({k: [c.clone() for c in v] for k, v in cond.items()}, out.clone(),
                                        kw.get("fs")))
            return out

        self.model.apply_model = apply_model
        return self

    def __exit__(self, *exc):
        del self.model.apply_model

    def callback(self, i, n, x_prev, pred_x0):
        self.steps.append((i, n, x_prev.clone(), pred_x0.clone()))
