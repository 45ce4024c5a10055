"""Shared fixtures: the upstream reference data copied into tests/data (see tests/data/REFERENCE.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

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
