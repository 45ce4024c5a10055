"""The whole DynamiCrafter model: checkpoint-compatible structure and the tiny reference weights."""
from __future__ import annotations

import pytest
import torch

from conftest import ATOL, RTOL, read_manifest
from dc_app import build_model, load_model_config
from dc_app.loading.checkpoints import RENAMED_KEYS
from dc_app.models.diffusion import SCHEDULE_BUFFERS, ddpm_buffers
from dc_app.schedule import dynamic_rescale_table, model_betas


def _file_key_to_model_key(key: str) -> str:
    for old, new in RENAMED_KEYS.items():
        key = key.replace(old, new)
    return key


@pytest.mark.parametrize("name", ["256", "512", "1024", "512_interp"])
def test_meta_build_matches_official_manifest(name):
    manifest = read_manifest("512" if name == "512_interp" else name)
    model = build_model(load_model_config(name), device="meta")
    sd = model.state_dict()
    expected = {_file_key_to_model_key(k): shape for k, shape, _ in manifest}
    assert len(expected) == len(manifest), "the rename must not merge keys"
    assert set(sd) == set(expected), (
        f"missing {sorted(set(expected) - set(sd))[:5]}, unexpected {sorted(set(sd) - set(expected))[:5]}"
    )
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in sd.items() if tuple(v.shape) != expected[k]}
    assert not wrong, f"shape mismatches: {list(wrong.items())[:5]}"
    # Parameters vs persistent buffers, as the manifest records them.
    params = {k for k, _ in model.named_parameters()}
    for key, _, kind in manifest:
        assert (_file_key_to_model_key(key) in params) == (kind == "param"), key
    assert all(p.device.type == "meta" for p in model.parameters())


def test_256_manifest_stores_framestride_names():
    keys = [k for k, _, _ in read_manifest("256")]
    assert sum("framestride_embed" in k for k in keys) == 4
    assert not any("fps_embedding" in k for k in keys)


def test_tiny_weights_load_strictly(tiny_weights):
    model = build_model(load_model_config("tiny"))
    missing, unexpected = model.load_state_dict(tiny_weights, strict=True)
    assert not missing and not unexpected
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_schedule_buffers_equal_upstream_tiny(tiny_weights):
    """Buffers computed from the tiny config equal upstream's float32 values bit for bit."""
    model = build_model(load_model_config("tiny"))
    for key in SCHEDULE_BUFFERS + ("scale_arr",):
        assert torch.equal(getattr(model, key), tiny_weights[key]), key


@pytest.mark.parametrize("name", ["256", "512", "1024"])
def test_schedule_buffers_of_real_configs(name, tiny_weights):
    """Real configs: the zero-SNR ones share the tiny model's betas; the 256 one is the plain SD schedule."""
    p = load_model_config(name).model.params
    zero_snr = bool(p.get("rescale_betas_zero_snr", False))
    betas = model_betas(p.linear_start, p.linear_end, p.timesteps, zero_snr)
    buffers = {k: v.float() for k, v in ddpm_buffers(betas, p.get("parameterization", "eps")).items()}
    if zero_snr:
        for key in SCHEDULE_BUFFERS:  # same schedule arithmetic as the tiny reference (also a v model)
            assert torch.equal(buffers[key], tiny_weights[key]), key
        assert buffers["alphas_cumprod"][-1] == 0 and buffers["betas"][-1] == 1
    else:
        assert 0.004 < float(buffers["alphas_cumprod"][-1]) < 0.005  # SD's plain schedule: alpha_bar_T ~ 0.0047
        assert torch.all(buffers["sqrt_recip_alphas_cumprod"] > 1)  # eps models keep the reciprocals
    if p.get("use_dynamic_rescale", False):
        table = dynamic_rescale_table(p.base_scale).float()
        assert table.shape == (1400,) and float(table[-1]) == pytest.approx(p.base_scale)


def test_model_surface(tiny_weights):
    model = build_model(load_model_config("tiny"))
    model.load_state_dict(tiny_weights)
    assert model.parameterization == "v" and model.num_timesteps == 1000
    assert model.temporal_length == 4 and model.perframe_ae and model.use_dynamic_rescale
    assert model.device.type == "cpu"
    assert callable(model.model.diffusion_model) and callable(model.embedder) and callable(model.image_proj_model)


def test_vae_round_trip_through_model(cases, tiny_weights):
    """encode_first_stage with the recorded posterior noise and decode_first_stage reproduce upstream."""
    model = build_model(load_model_config("tiny"))
    model.load_state_dict(tiny_weights)
    z = model.encode_first_stage(cases["vae_x"], noise=cases["vae_z_sample_noise"])
    torch.testing.assert_close(z, cases["vae_z_sample"], atol=ATOL, rtol=RTOL)
    z_mode = model.encode_first_stage(cases["vae_x"], sample=False)
    torch.testing.assert_close(z_mode, cases["vae_z_mode"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model.decode_first_stage(cases["vae_z_mode"]), cases["vae_decode_perframe"],
                               atol=ATOL, rtol=RTOL)
    model.perframe_ae = False
    torch.testing.assert_close(model.decode_first_stage(cases["vae_z_mode"]), cases["vae_decode_batched"],
                               atol=ATOL, rtol=RTOL)
    # Chunked decode (2 frames at a time) equals the whole-batch decode within float rounding.
    torch.testing.assert_close(model.decode_first_stage(cases["vae_z_mode"], chunk_size=2),
                               cases["vae_decode_batched"], atol=ATOL, rtol=RTOL)


def test_conditioning_through_model(cases, tiny_weights):
    model = build_model(load_model_config("tiny"))
    model.load_state_dict(tiny_weights)
    torch.testing.assert_close(model.get_learned_conditioning(["a cat", ""]), cases["text_cond"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model.encode_image_tokens(cases["image_in"]), cases["image_proj"], atol=ATOL, rtol=RTOL)
    out = model.apply_model(
        cases["unet_x"][:, :4], cases["unet_timesteps"],
        {"c_concat": [cases["unet_x"][:, 4:]], "c_crossattn": [cases["unet_context"]]}, fs=cases["unet_fs"],
    )
    torch.testing.assert_close(out, cases["unet_out"], atol=ATOL, rtol=RTOL)
