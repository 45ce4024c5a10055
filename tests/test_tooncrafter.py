"""ToonCrafter: checkpoint-key parity of the 512 model, and the tiny model against upstream's tensors
(tests/data/tooncrafter/REFERENCE.md): encode with reference features, the dual-reference decoder, both full
5-step interpolation runs with the recorded noise, and stock vs fixed at a zero-SNR NaN setting."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ATOL, ATOL_SAMPLER, DATA, RTOL, Recorder, read_manifest, read_manifest_file
from dc_app import build_model, load_model_config, load_pretrained
from dc_app.loading.spec import model_spec
from dc_app.models.attention_kernel import attention_backend
from dc_app.models.dualref_decoder import Combiner, DualRefAutoencoderKL
from dc_app.pipeline import decode_with_references, image_guided_synthesis, image_guided_synthesis_fixed, run_synthesis

TOON = DATA / "tooncrafter"
# Suggested by the reference README, section 7: the per-layer outputs reach |values| ~ 36.
ATOL_LAYERS = 2e-4
# The full runs: upstream image_guided_synthesis arguments of meta.sampler (fs 10, interp, trailing, rescale 0.7).
RUN_ARGS = dict(n_samples=1, ddim_steps=5, unconditional_guidance_scale=7.5, cfg_img=None, fs=10, text_input=True,
                loop=False, interp=True, timestep_spacing="uniform_trailing", guidance_rescale=0.7)


@pytest.fixture(scope="module")
def toon_cases() -> dict[str, torch.Tensor]:
    return load_file(str(TOON / "cases.safetensors"))


@pytest.fixture(scope="module")
def toon_meta() -> dict:
    return json.loads((TOON / "cases.json").read_text())["meta"]


@pytest.fixture(scope="module")
def toon_weights(tiny_weights) -> dict[str, torch.Tensor]:
    """The tiny ToonCrafter state_dict: the DynamiCrafter tiny weights plus the 112 new decoder parameters."""
    delta = load_file(str(TOON / "weights_delta.safetensors"))
    assert not set(delta) & set(tiny_weights), "the delta holds new keys only"
    return {**tiny_weights, **delta}


@pytest.fixture(scope="module")
def toon_model(toon_weights):
    model = build_model(load_model_config("tooncrafter_tiny"))
    model.load_state_dict(toon_weights, strict=True)
    return model


@pytest.fixture(scope="module")
def references(toon_cases) -> list[torch.Tensor]:
    return [toon_cases[f"enc_ref_context.{i}"] for i in range(5)]


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


# ------------------------------------------------------------------------------------------- structure
def test_meta_build_matches_checkpoint_manifest():
    """Keys, shapes, state_dict order and parameter/buffer kind of the released checkpoint's config."""
    manifest = read_manifest_file(TOON / "keys" / "tooncrafter_512.tsv")
    assert len(manifest) == 2668
    model = build_model(load_model_config("tooncrafter_512"), device="meta")
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = [(k, shape) for k, shape, _ in manifest]
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    assert not missing and not unexpected, f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
    assert got == expected  # state_dict order too
    params = {k for k, _ in model.named_parameters()}
    for key, _, kind in manifest:
        assert (key in params) == (kind == "param"), key
    assert all(p.device.type == "meta" for p in model.parameters())


def test_new_keys_are_the_decoder_only():
    """ToonCrafter = DynamiCrafter 512 + 148 decoder keys; the models we build differ by exactly those."""
    toon = {k: s for k, s, _ in read_manifest_file(TOON / "keys" / "tooncrafter_512.tsv")}
    dc = {k: s for k, s, _ in read_manifest("512")}
    new = set(toon) - set(dc)
    assert not set(dc) - set(toon) and len(new) == 148
    assert all(k.startswith("first_stage_model.decoder.") for k in new)
    toon_model = build_model(load_model_config("tooncrafter_512"), device="meta").state_dict()
    dc_model = build_model(load_model_config("512_interp"), device="meta").state_dict()
    assert set(toon_model) - set(dc_model) == new


def test_tiny_config_is_the_reference_config():
    ours = load_model_config("tooncrafter_tiny")
    reference = OmegaConf.load(TOON / "config.yaml")
    assert OmegaConf.to_container(ours.model) == OmegaConf.to_container(reference.model)
    assert OmegaConf.to_container(ours.open_clip_model_cfgs) == OmegaConf.to_container(reference.open_clip_model_cfgs)


def test_defaults_of_the_512_model():
    cfg = load_model_config("tooncrafter_512")
    model, spec = build_model(cfg, device="meta"), model_spec(cfg)
    d = spec.defaults
    assert (spec.hub_repo, spec.hub_file, spec.local_checkpoint) == (
        "Doubiiu/ToonCrafter", "model.ckpt", "tooncrafter_512_interp_v1/model.ckpt")  # upstream's README layout
    assert (d.timestep_spacing, d.guidance_rescale, d.fs, d.fs_range) == ("uniform_trailing", 0.7, 10, (5, 30))
    assert (d.ddim_steps, d.ddim_eta, d.cfg_scale, d.interp) == (50, 1.0, 7.5, True)
    assert model.temporal_length == 16 and model.image_size == (40, 64)  # 16 frames of 320x512
    assert model.temporal_decoder and isinstance(model.first_stage_model, DualRefAutoencoderKL)


def test_only_tooncrafter_has_a_temporal_decoder(toon_model, tiny_weights):
    plain = build_model(load_model_config("tiny"))
    assert toon_model.temporal_decoder and not plain.temporal_decoder
    with pytest.raises(ValueError, match="reference"):
        plain.encode_keyframes(torch.zeros(1, 3, 2, 64, 64))


def test_unknown_first_stage_target_is_refused():
    cfg = load_model_config("tooncrafter_tiny")
    cfg.model.params.first_stage_config.target = "lvdm.models.autoencoder.SomethingElse"
    with pytest.raises(ValueError, match="first_stage_config.target"):
        build_model(cfg, device="meta")


def test_tooncrafter_tiny_gets_seeded_random_weights(toon_weights):
    a = load_pretrained("tooncrafter_tiny", device="cpu")
    b = load_pretrained("tooncrafter_tiny", device="cpu")
    assert set(a.state_dict()) == set(toon_weights)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # No zero-initialised branch left: the Combiners and fusion outputs are live.
    decoder = a.first_stage_model.decoder
    assert decoder.attn_refinement[0].conv.weight.abs().sum() > 0
    assert decoder.attn_refinement[2].to_out[0].weight.abs().sum() > 0


# -------------------------------------------------------------------------------------------- encode
def test_encode_with_references_matches_upstream(toon_model, toon_cases):
    video = toon_cases["interp_video_in"]  # [start, start, end, end]
    frames = video.permute(0, 2, 1, 3, 4).reshape(4, 3, 64, 64)
    with torch.no_grad():
        posterior, _ = toon_model.first_stage_model.encode_with_references(frames, batch=1)
    close(posterior.mean, toon_cases["enc_posterior_mean"])
    close(posterior.logvar, toon_cases["enc_posterior_logvar"])
    close(posterior.std, toon_cases["enc_posterior_std"])
    z, refs = toon_model.encode_keyframes(video, noise=toon_cases["enc_z_noise"])
    close(z, toon_cases["enc_z"])
    assert len(refs) == 5
    for i, ref in enumerate(refs):
        close(ref, toon_cases[f"enc_ref_context.{i}"])


def test_encode_draws_one_batch_of_posterior_noise(toon_model, toon_cases):
    """Without injected noise: one draw of ((b t), 4, h, w) from the global RNG, as upstream's encode."""
    video = toon_cases["interp_video_in"]
    torch.manual_seed(11)
    z, _ = toon_model.encode_keyframes(video)
    close(z, toon_cases["enc_z"])  # upstream seeded 11 before its call (meta.enc)


# -------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_decode_with_references_matches_upstream(toon_model, toon_cases, references, backend):
    with attention_backend(backend):
        close(toon_model.decode_first_stage(toon_cases["dec_z"], references=references), toon_cases["dec_out"])


def test_decoder_direct_call_matches_upstream(toon_model, toon_cases, references):
    with torch.no_grad():
        out = toon_model.first_stage_model.decode(toon_cases["dec_z_unscaled"], num_frames=4, references=references)
    close(out, toon_cases["dec_out_direct"])


def test_decode_without_references_skips_injection_and_post_quant_conv(toon_model, toon_cases):
    """Upstream's decode_first_stage(z) without references: no refinement, and still no post_quant_conv."""
    close(toon_model.decode_first_stage(toon_cases["dec_z"]), toon_cases["dec_out_noref"])
    vae = toon_model.first_stage_model
    saved = vae.post_quant_conv.weight.clone()
    try:
        with torch.no_grad():
            vae.post_quant_conv.weight.mul_(3.0)
        close(toon_model.decode_first_stage(toon_cases["dec_z"]), toon_cases["dec_out_noref"])
    finally:
        with torch.no_grad():
            vae.post_quant_conv.weight.copy_(saved)


def test_short_and_split_chunks_match_upstream(toon_model, toon_cases, references):
    """2 frames = one 2-frame chunk; 6 frames with temporal_length 4 = chunks [0..3] and [4, 5], each
    with its own first/last injection and GroupNorm statistics."""
    close(toon_model.decode_first_stage(toon_cases["dec_z"][:, :, [0, 3]], references=references),
          toon_cases["dec_out_T2"])
    close(toon_model.decode_first_stage(toon_cases["dec_z_T6"], references=references), toon_cases["dec_out_T6"])


def test_decode_chunk_size_and_perframe_ae_do_not_change_the_chunk(toon_model, toon_cases, references):
    expected = toon_cases["dec_out"]
    close(toon_model.decode_first_stage(toon_cases["dec_z"], chunk_size=1, references=references), expected)
    saved = toon_model.perframe_ae
    try:
        toon_model.perframe_ae = not saved
        close(toon_model.decode_first_stage(toon_cases["dec_z"], references=references), expected)
    finally:
        toon_model.perframe_ae = saved


def test_combiner_adds_to_the_chunk_ends_and_keeps_its_input():
    """Closed form: first frame + conv(first reference), last frame + conv(last reference), middle untouched;
    a one-frame chunk gets both adds (upstream's x[:, :, 0] then x[:, :, -1])."""
    torch.manual_seed(0)
    combiner = Combiner(4)
    x, ref = torch.randn(3, 4, 5, 5), torch.randn(1, 4, 2, 5, 5)
    kept = x.clone()

    def conv(r: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(r, combiner.conv.weight, combiner.conv.bias)

    with torch.no_grad():
        out = combiner(x, ref, num_frames=3)
        close(out, torch.stack([x[0] + conv(ref[:, :, 0])[0], x[1], x[2] + conv(ref[:, :, 1])[0]]))
        torch.testing.assert_close(x, kept, atol=0, rtol=0)
        single = combiner(x[:1], ref, num_frames=1)
    close(single, x[:1] + conv(ref[:, :, 0]) + conv(ref[:, :, 1]))


LAYERS = ["conv_in", "mid.block_1", "mid.attn_1", "mid.block_2", "up.3.block.0", "up.3.block.1",
          "attn_refinement.3", "up.3.upsample", "up.2.block.0", "up.2.block.1", "attn_refinement.2",
          "attn_refinement.1"]


def test_decoder_layer_outputs_match_upstream(toon_model, toon_cases, references):
    decoder = toon_model.first_stage_model.decoder
    seen: dict[str, torch.Tensor] = {}
    hooks = [decoder.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())) for name in LAYERS]
    # The 2-D conv_out output, before the temporal conv: time_mix_conv's input (b c t h w).
    hooks.append(decoder.conv_out.time_mix_conv.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("conv_out_spatial", args[0].clone())))
    try:
        toon_model.decode_first_stage(toon_cases["dec_z"], references=references)
    finally:
        for hook in hooks:
            hook.remove()
    for name in LAYERS + ["conv_out_spatial"]:
        close(seen[name], toon_cases[f"dec_dbg.{name}"], atol=ATOL_LAYERS)


def test_middle_frame_redecode_at_8_frames(toon_model, toon_cases, references, monkeypatch):
    """Upstream's fix-up at T = 8 in one 8-frame chunk: output frames 3, 4 come from the 6-frame decode of
    latent frames [0, 2, 3, 4, 5, 7] (its frames 2, 3)."""
    monkeypatch.setattr(toon_model, "temporal_length", 8)
    z = toon_cases["post8_z"]
    close(toon_model.decode_first_stage(z, references=references), toon_cases["post8_decode_full"])
    close(toon_model.decode_first_stage(z[:, :, [0, 2, 3, 4, 5, 7]], references=references),
          toon_cases["post8_decode_middle"])
    video = decode_with_references(toon_model, z, references)
    close(video, toon_cases["post8_video"])
    # Only frames 3 and 4 differ from the plain decode.
    differs = (video - toon_cases["post8_decode_full"]).abs().amax(dim=(0, 1, 3, 4)) > 1e-3
    assert differs.tolist() == [False, False, False, True, True, False, False, False]


@pytest.mark.parametrize("tag", ["eta0", "eta1"])
def test_decode_of_the_recorded_runs(tag, toon_model, toon_cases, references):
    """The decode stage of both full runs alone, from upstream's final latent (decoder tolerance)."""
    latent = toon_cases[f"sampler_{tag}_final_latent"]
    close(toon_model.decode_first_stage(latent, references=references), toon_cases[f"sampler_{tag}_decode_full"])
    middle = toon_cases[f"sampler_{tag}_middle_latent"]
    torch.testing.assert_close(middle, latent[:, :, [0, 3]], atol=0, rtol=0)
    close(toon_model.decode_first_stage(middle, references=references), toon_cases[f"sampler_{tag}_decode_middle"])
    close(decode_with_references(toon_model, latent, references), toon_cases[f"sampler_{tag}_video"][:, 0])


# ---------------------------------------------------------------------------------------- full runs
@pytest.mark.parametrize("tag", ["eta0", "eta1"])
@pytest.mark.parametrize("synthesis", [image_guided_synthesis, image_guided_synthesis_fixed], ids=["stock", "fixed"])
def test_full_interpolation_run_with_recorded_noise(tag, synthesis, toon_model, toon_cases, toon_meta):
    run = toon_meta["sampler_runs"][tag]
    assert run["finite"]
    with Recorder(toon_model) as rec:
        video = synthesis(
            toon_model, [toon_meta["sampler"]["prompt"]], toon_cases["interp_video_in"], [1, 4, 4, 8, 8],
            ddim_eta=run["eta"], x_T=toon_cases[f"sampler_{tag}_x_T"],
            variance_noise=toon_cases[f"sampler_{tag}_step_noise"],
            posterior_noise=toon_cases[f"sampler_{tag}_posterior_noise"], callback=rec.callback, **RUN_ARGS,
        )
    # One batched call per step: uncond first, then cond; fs 10 for both.
    assert len(rec.calls) == 5
    for i, (cond, out, fs) in enumerate(rec.calls):
        assert fs.tolist() == [10, 10]
        close(cond["c_crossattn"][0][0], toon_cases[f"sampler_{tag}_uncond_crossattn"][0])
        close(cond["c_crossattn"][0][1], toon_cases[f"sampler_{tag}_cond_crossattn"][0])
        for row in cond["c_concat"][0]:  # first and last keyframe latents, zeros between
            close(row[None], toon_cases[f"sampler_{tag}_c_concat"])
        close(out[:1], toon_cases[f"sampler_{tag}_model_out_uncond"][i], atol=ATOL_SAMPLER)
        close(out[1:], toon_cases[f"sampler_{tag}_model_out_cond"][i], atol=ATOL_SAMPLER)
    assert [s[0] for s in rec.steps] == list(range(5))
    for i, _, x_prev, pred_x0 in rec.steps:
        close(pred_x0, toon_cases[f"sampler_{tag}_pred_x0"][i], atol=ATOL_SAMPLER)
        close(x_prev, toon_cases[f"sampler_{tag}_x_prev"][i], atol=ATOL_SAMPLER)
    close(rec.steps[-1][2], toon_cases[f"sampler_{tag}_final_latent"], atol=ATOL_SAMPLER)
    assert video.shape == (1, 1, 3, 4, 64, 64)
    close(video, toon_cases[f"sampler_{tag}_video"], atol=ATOL_SAMPLER)


def test_stock_is_nan_and_fixed_finite_at_7_steps_eta_1(toon_model, toon_cases):
    """The 512 model's NaN setting (zero-SNR, trailing, eta 1, 7 steps): upstream's arithmetic gives a NaN
    (black) video from step 0; the fixed sampler, with the same noise, a finite one."""
    args = dict(RUN_ARGS, ddim_steps=7)
    results = {sampler: run_synthesis(toon_model, sampler, ["an anime scene"], toon_cases["interp_video_in"],
                                      [1, 4, 4, 8, 8], ddim_eta=1.0, generator=torch.Generator().manual_seed(7),
                                      **args)
               for sampler in ("stock", "fixed")}
    stock, fixed = results["stock"], results["fixed"]
    assert torch.isnan(stock.videos).all()
    assert stock.nonfinite is not None and stock.nonfinite["step"] == 0 and stock.nonfinite["timestep"] == 999
    assert torch.isfinite(fixed.videos).all() and fixed.nonfinite is None
    assert fixed.videos.std() > 0 and fixed.ddim_timesteps == stock.ddim_timesteps


def test_loop_and_i2v_modes_also_decode_with_references(toon_model):
    """Upstream ToonCrafter always decodes with the first/last frame references; no mode may crash or NaN."""
    frames = torch.rand(1, 3, 4, 64, 64) * 2 - 1
    for mode in (dict(loop=True), dict()):
        result = run_synthesis(toon_model, "fixed", ["x"], frames, [1, 4, 4, 8, 8], ddim_steps=2,
                               generator=torch.Generator().manual_seed(0), **mode)
        assert torch.isfinite(result.videos).all() and result.videos.shape == (1, 1, 3, 4, 64, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vae_runs_close_to_float32(dtype, toon_weights, toon_cases, references):
    # Loose bounds: only catches broken low-precision paths (dtype mismatch, overflow, NaN), not rounding.
    model = build_model(load_model_config("tooncrafter_tiny"))
    model.load_state_dict(toon_weights, strict=True)
    model.set_dtype(torch.float32, vae_dtype=dtype)
    z, refs = model.encode_keyframes(toon_cases["interp_video_in"], noise=toon_cases["enc_z_noise"])
    assert refs[0].dtype == dtype
    torch.testing.assert_close(z, toon_cases["enc_z"], atol=0.05, rtol=0.05)
    decoded = model.decode_first_stage(toon_cases["dec_z"], references=references)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, toon_cases["dec_out"], atol=0.2, rtol=0.05)
