"""UNet parity with upstream DynamiCrafter: tiny-model outputs and intermediates, checkpoint manifests, dtypes.

Reference data: tests/data/tiny/cases.safetensors (upstream outputs, float32 CPU) and tests/data/keys/*.tsv
(upstream state_dict manifests). See tests/data/REFERENCE.md, sections 1, 2.3 and 3.2.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ATOL, RTOL, read_manifest
from dc_app.loading.spec import load_model_config
from dc_app.models.attention_kernel import attention_backend
from dc_app.models.unet import UNetModel

PREFIX = "model.diffusion_model."
BACKENDS = ("sdpa", "math")

# (reference tensor, context tensor, fs tensor or None): the three upstream UNet calls in cases.json.
UNET_CALLS = {
    "unet_out": ("unet_context", "unet_fs"),
    "unet_out_default_fs": ("unet_context", None),  # fs=None -> default_fs (24) for every sample
    "unet_out_context_shared": ("unet_context_shared", "unet_fs"),  # 93 tokens != 77 + 16*4: broadcast branch
}


def unet_params(name: str, **overrides) -> dict:
    params = dict(load_model_config(name).model.params.unet_config.params)
    params.update(overrides)
    return params


def unet_slice(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's entries of a full LatentVisualDiffusion state_dict, prefix removed."""
    return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}


def build_tiny(tiny_weights, dtype: torch.dtype = torch.float32, **overrides) -> UNetModel:
    model = UNetModel(**unet_params("tiny", **overrides))
    model.load_state_dict(unet_slice(tiny_weights), strict=True)
    return model.to(dtype).eval()


def run(model: UNetModel, cases, out_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    context_name, fs_name = UNET_CALLS[out_name]
    fs = None if fs_name is None else cases[fs_name]
    with torch.no_grad():
        x, context = cases["unet_x"].to(dtype), cases[context_name].to(dtype)
        return model(x, cases["unet_timesteps"], context=context, fs=fs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = ATOL, rtol: float = RTOL):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    err = (actual.float() - expected).abs().max().item()
    assert torch.allclose(actual.float(), expected, atol=atol, rtol=rtol), f"{name}: max abs error {err:.3e}"


@pytest.fixture(scope="module")
def tiny_unet(tiny_weights) -> UNetModel:
    return build_tiny(tiny_weights)


def test_tiny_checkpoint_loads_strictly(tiny_unet, tiny_weights):
    # strict=True already raised on any mismatch in build_tiny; also pin the count (726 UNet entries).
    expected = unet_slice(tiny_weights)
    ours = tiny_unet.state_dict()
    assert set(ours) == set(expected)
    assert len(ours) == 726
    for key, value in expected.items():
        assert ours[key].shape == value.shape, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_name", list(UNET_CALLS))
def test_unet_matches_upstream(tiny_unet, cases, out_name, backend):
    # Observed max abs error (CPU, 2 threads): 3.1e-6 for every call and both backends.
    with attention_backend(backend):
        out = run(tiny_unet, cases, out_name)
    assert out.dtype == torch.float32
    assert_close(out, cases[out_name], out_name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_intermediates_match_upstream(tiny_unet, cases, cases_meta, backend):
    """Forward hooks on upstream's module names see upstream's `unet_dbg.*` tensors during the unet_out call."""
    names = [k[len("unet_dbg."):] for k in cases_meta["tensors"] if k.startswith("unet_dbg.")]
    assert {"time_embed", "fps_embedding", "input_blocks.0", "init_attn", "middle_block"} <= set(names)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        tiny_unet.get_submodule(name).register_forward_hook(
            lambda _module, _args, output, name=name: captured[name].append(output.detach().clone())
        )
        for name in names
    ]
    try:
        with attention_backend(backend):
            run(tiny_unet, cases, "unet_out")
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        assert len(captured[name]) == 1, f"{name}: hook fired {len(captured[name])} times, expected once"
        assert_close(captured[name][0], cases[f"unet_dbg.{name}"], f"unet_dbg.{name}")


def test_norm_eps_values(tiny_unet):
    """README 3.2: GroupNorm eps 1e-5 in ResBlocks, temporal convs and `out`, 1e-6 in the transformers; every
    LayerNorm 1e-5. Checked directly: using 1e-5 in the transformers moves unet_out by only ~2e-5, below ATOL."""
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    eps = {name: m.eps for name, m in tiny_unet.named_modules() if isinstance(m, norm_types)}
    transformer_norms = {n for n in eps if n.endswith(".norm") and "transformer_blocks" not in n}
    assert len(transformer_norms) == 15  # 7 spatial + 7 temporal + init_attn
    for name, value in eps.items():
        expected = 1e-6 if name in transformer_norms else 1e-5
        assert value == expected, f"{name}: eps {value}, expected {expected}"


@pytest.mark.parametrize("out_name", list(UNET_CALLS))
def test_sdpa_matches_math_backend(tiny_unet, cases, out_name):
    with attention_backend("sdpa"):
        sdpa = run(tiny_unet, cases, out_name)
    with attention_backend("math"):
        math = run(tiny_unet, cases, out_name)
    assert (sdpa - math).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["256", "512", "1024"])
def test_state_dict_matches_checkpoint_manifest(name):
    """Meta-device build: same keys, order, shapes and kinds as the released checkpoint's UNet entries."""
    with torch.device("meta"):
        model = UNetModel(**unet_params(name))
    assert all(p.device.type == "meta" for p in model.parameters())
    # The 256 file names the fs MLP `framestride_embed`; upstream's loader renames it to `fps_embedding`.
    rows = [
        (key[len(PREFIX):].replace("framestride_embed", "fps_embedding"), shape, kind)
        for key, shape, kind in read_manifest(name)
        if key.startswith(PREFIX)
    ]
    assert len(rows) == (1532 if name == "256" else 1516)
    state = model.state_dict()
    assert set(state) == {key for key, _, _ in rows}
    assert list(state) == [key for key, _, _ in rows], "state_dict order differs from the checkpoint's"
    params = dict(model.named_parameters())
    for key, shape, kind in rows:
        assert tuple(state[key].shape) == shape, f"{key}: {tuple(state[key].shape)}, manifest {shape}"
        assert (key in params) == (kind == "param"), f"{key}: manifest kind {kind}"


# Observed on CPU vs the float32 upstream reference (|unet_out| <= 1.9):
#   float16: max abs 8.4e-3, relative L2 3.4e-3;  bfloat16: max abs 6.2e-2, relative L2 2.8e-2.
# Bounds are a few times those: a real defect (wrong norm, dropped branch) gives relative errors of O(1).
HALF_BOUNDS = {torch.float16: (0.05, 0.01), torch.bfloat16: (0.25, 0.08)}


@pytest.mark.parametrize("dtype", list(HALF_BOUNDS), ids=["float16", "bfloat16"])
def test_half_precision_close_to_float32(tiny_weights, cases, dtype):
    model = build_tiny(tiny_weights, dtype)
    out = run(model, cases, "unet_out", dtype)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = cases["unet_out"]
    max_abs = (out.float() - expected).abs().max().item()
    rel_l2 = ((out.float() - expected).norm() / expected.norm()).item()
    max_abs_bound, rel_l2_bound = HALF_BOUNDS[dtype]
    report = f"{dtype}: max abs {max_abs:.3e}, rel L2 {rel_l2:.3e}"
    assert max_abs < max_abs_bound and rel_l2 < rel_l2_bound, report


def test_learnable_image_scale(tiny_weights, cases):
    """256-style lambda = tanh(alpha) + 1: alpha = 0 is lambda = 1 (the tiny reference); alpha = -inf is
    lambda = 0, the same as giving every frame the 77 text tokens only."""
    model = UNetModel(**unet_params("tiny", image_cross_attention_scale_learnable=True))
    alphas = [k for k in model.state_dict() if k.endswith("attn2.alpha")]
    assert len(alphas) == 7  # one per spatial transformer: input 2, middle 1, output 4
    missing, unexpected = model.load_state_dict(unet_slice(tiny_weights), strict=False)
    assert sorted(missing) == sorted(alphas) and not unexpected
    model.eval()
    assert_close(run(model, cases, "unet_out"), cases["unet_out"], "unet_out with alpha = 0")

    with torch.no_grad():
        for key in alphas:
            model.get_parameter(key).fill_(float("-inf"))
        no_image = run(model, cases, "unet_out")
        text_only = model(
            cases["unet_x"], cases["unet_timesteps"], context=cases["unet_context"][:, :77], fs=cases["unet_fs"]
        )
    assert torch.allclose(no_image, text_only, atol=1e-5)
    assert (no_image - cases["unet_out"]).abs().max() > 1e-2  # the image branch really was switched off


@pytest.mark.parametrize(
    "setting", ["use_relative_position", "use_causal_attention"]
)
def test_rejects_settings_the_released_models_do_not_use(setting):
    with pytest.raises(ValueError, match=setting):
        UNetModel(**unet_params("tiny", **{setting: True}))


def test_rejects_malformed_inputs(tiny_unet, cases):
    x, t, context = cases["unet_x"], cases["unet_timesteps"], cases["unet_context"]
    with pytest.raises(ValueError, match="expected"):
        tiny_unet(x[:, :4], t, context=context)  # 4 channels: the concat image latent is missing
    with pytest.raises(ValueError, match="context"):
        tiny_unet(x, t, context=None)
    with pytest.raises(ValueError, match="fs"):
        tiny_unet(x, t, context=context, fs=torch.tensor([3, 24, 8]))


@pytest.mark.slow
def test_compiles_without_graph_breaks(tiny_unet, cases):
    """fullgraph=True fails on any graph break; the eager backend needs no C++ compiler."""
    compiled = torch.compile(tiny_unet, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(
            cases["unet_x"], cases["unet_timesteps"], context=cases["unet_context"], fs=cases["unet_fs"]
        )
    assert_close(out, cases["unet_out"], "compiled unet_out")
