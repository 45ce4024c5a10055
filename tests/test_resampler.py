"""Resampler against upstream's tiny-model image projections, and checkpoint-key parity for the real ones."""
from __future__ import annotations

import pytest
import torch

from conftest import ATOL, RTOL, read_manifest
from dc_app.loading.spec import load_model_config
from dc_app.models.attention_kernel import attention_backend
from dc_app.models.resampler import Resampler

PREFIX = "image_proj_model."


@pytest.fixture(scope="module")
def resampler(tiny_weights) -> Resampler:
    params = load_model_config("tiny").model.params.image_proj_stage_config.params
    model = Resampler(**params)
    weights = {k[len(PREFIX):]: v for k, v in tiny_weights.items() if k.startswith(PREFIX)}
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.mark.parametrize("embed, expected", [("image_embed", "image_proj"), ("image_large_embed", "image_large_proj")])
def test_matches_reference(resampler, cases, embed, expected):
    with torch.no_grad():
        out = resampler(cases[embed])
    assert out.shape == cases[expected].shape  # (B, 16 queries * 4 frames, 64)
    torch.testing.assert_close(out, cases[expected], atol=ATOL, rtol=RTOL)


def test_sdpa_and_math_backends_agree(resampler, cases):
    x = cases["image_embed"]
    with torch.no_grad():
        with attention_backend("sdpa"):
            sdpa = resampler(x)
        with attention_backend("math"):
            math = resampler(x)
    torch.testing.assert_close(sdpa, math, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(math, cases["image_proj"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_float32(resampler, cases, dtype):
    model = Resampler(**load_model_config("tiny").model.params.image_proj_stage_config.params)
    model.load_state_dict(resampler.state_dict())
    model = model.to(dtype).eval()
    with torch.no_grad():
        out = model(cases["image_embed"].to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), cases["image_proj"], atol=0.15, rtol=0.05)


def test_rejects_wrong_width(resampler):
    with pytest.raises(ValueError, match="expected image tokens"):
        resampler(torch.zeros(1, 50, 32))
    with pytest.raises(ValueError, match="positive"):
        Resampler(dim=64, depth=0, dim_head=16, heads=2, num_queries=16, embedding_dim=64, output_dim=64)


@pytest.mark.parametrize("name", ["512", "256"])
def test_meta_build_matches_manifest(name):
    params = load_model_config(name).model.params.image_proj_stage_config.params
    with torch.device("meta"):
        model = Resampler(**params)
    rows = [row for row in read_manifest(name) if row[0].startswith(PREFIX)]
    expected = [(k[len(PREFIX):], shape) for k, shape, _ in rows]
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same keys, shapes and state_dict order
    assert all(kind == "param" for _, _, kind in rows)
    assert {k for k, _ in model.named_parameters()} == {k for k, _ in expected}
