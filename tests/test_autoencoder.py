"""AutoencoderKL against upstream's tiny-model VAE outputs, and checkpoint-key parity for the real VAEs."""
from __future__ import annotations

import pytest
import torch

from conftest import ATOL, RTOL, read_manifest, strip_prefix
from dc_app.loading.spec import load_model_config
from dc_app.models.attention_kernel import attention_backend
from dc_app.models.autoencoder import AutoencoderKL, DiagonalGaussian

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215  # the diffusion model's latent scale; applied by the caller, not by the VAE


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """(b, c, t, h, w) -> (b*t, c, h, w), batch-major (the cases' `(b t) c h w` layout)."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def to_video(frames: torch.Tensor, b: int) -> torch.Tensor:
    """(b*t, c, h, w) -> (b, c, t, h, w)."""
    bt, c, h, w = frames.shape
    return frames.reshape(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def vae(tiny_weights) -> AutoencoderKL:
    params = load_model_config("tiny").model.params.first_stage_config.params
    model = AutoencoderKL(**params)
    model.load_state_dict(strip_prefix(tiny_weights, PREFIX), strict=True)
    return model.eval()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_posterior_matches_reference(vae, cases, backend):
    with torch.no_grad(), attention_backend(backend):
        posterior = vae.encode(to_frames(cases["vae_x"]))
    torch.testing.assert_close(posterior.mean, cases["vae_posterior_mean"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(posterior.logvar, cases["vae_posterior_logvar"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(posterior.std, cases["vae_posterior_std"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(to_video(posterior.mode(), 1) * SCALE_FACTOR, cases["vae_z_mode"], atol=ATOL, rtol=RTOL)


def test_sample_with_injected_noise_matches_reference(vae, cases):
    with torch.no_grad():
        posterior = vae.encode(to_frames(cases["vae_x"]))
    z = posterior.sample(noise=cases["vae_z_sample_noise"]) * SCALE_FACTOR  # (t, 4, 8, 8)
    torch.testing.assert_close(to_video(z, 1), cases["vae_z_sample"], atol=ATOL, rtol=RTOL)


def test_sample_draws_from_global_cpu_rng_like_upstream():
    # Upstream draws randn(mean.shape) from the global RNG; a seeded run must consume the same stream.
    moments = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussian(moments)
    torch.manual_seed(123)
    got = posterior.sample()
    torch.manual_seed(123)
    expected = posterior.mean + posterior.std * torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    gen = torch.Generator().manual_seed(7)
    expected = posterior.mean + posterior.std * torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(posterior.sample(generator=gen), expected, atol=0, rtol=0)


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), -100.0), torch.full((1, 2, 2, 2), 100.0)], 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar[:, :2].eq(-30.0).all() and posterior.logvar[:, 2:].eq(20.0).all()
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_decode_per_frame_matches_reference(vae, cases):
    frames = to_frames(cases["vae_z_mode"] / SCALE_FACTOR)  # (t, 4, 8, 8)
    with torch.no_grad():
        decoded = torch.cat([vae.decode(frame[None]) for frame in frames])  # (t, 3, 64, 64)
    torch.testing.assert_close(to_video(decoded, 1), cases["vae_decode_perframe"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_decode_batched_matches_reference(vae, cases, backend):
    with torch.no_grad(), attention_backend(backend):
        decoded = vae.decode(to_frames(cases["vae_z_mode"] / SCALE_FACTOR))
    torch.testing.assert_close(to_video(decoded, 1), cases["vae_decode_batched"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_float32(vae, cases, dtype):
    # Loose bounds: only catches broken low-precision paths (wrong dtype, overflow, NaN), not rounding.
    model = AutoencoderKL(**load_model_config("tiny").model.params.first_stage_config.params)
    model.load_state_dict(vae.state_dict())
    model = model.to(dtype).eval()
    # One frame only: CPU half-precision convolutions are slow.
    with torch.no_grad():
        posterior = model.encode(to_frames(cases["vae_x"])[:1].to(dtype))
        decoded = model.decode(to_frames(cases["vae_z_mode"] / SCALE_FACTOR)[:1].to(dtype))
    assert posterior.mean.dtype == dtype and posterior.sample().dtype == dtype and decoded.dtype == dtype
    torch.testing.assert_close(posterior.mean.float(), cases["vae_posterior_mean"][:1], atol=0.1, rtol=0.05)
    torch.testing.assert_close(decoded.float(), to_frames(cases["vae_decode_batched"])[:1], atol=0.2, rtol=0.05)


def test_rejects_wrong_shapes(vae):
    with pytest.raises(ValueError, match="expected"):
        vae.encode(torch.zeros(1, 3, 4, 64, 64))
    with pytest.raises(ValueError, match="expected"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="noise"):
        DiagonalGaussian(torch.zeros(1, 8, 2, 2)).sample(noise=torch.zeros(1, 4, 3, 3))


@pytest.mark.parametrize("name", ["512", "256"])
def test_meta_build_matches_manifest(name):
    params = load_model_config(name).model.params.first_stage_config.params
    with torch.device("meta"):
        model = AutoencoderKL(**params)
    expected = [(k[len(PREFIX):], shape) for k, shape, kind in read_manifest(name) if k.startswith(PREFIX)]
    assert all(kind == "param" for k, _, kind in read_manifest(name) if k.startswith(PREFIX))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same keys, shapes and state_dict order
    assert {k for k, _ in model.named_parameters()} == {k for k, _ in expected}
