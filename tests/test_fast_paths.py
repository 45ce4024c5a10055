"""Every fast path equals the plain path it replaces, on the whole tiny model (seeded random weights).

SDPA vs the plain-math attention, batched vs two-call classifier-free guidance, chunked vs whole VAE decode,
chunked vs whole transformer blocks and feed-forwards, CPU offload vs none, the CUDA batch-split guard of the
attention kernel (forced on CPU), and half precision against float32. Runs inject every random draw (x_T, per-step noise, posterior noise), so two paths see the
same numbers and may differ only by float rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ATOL, RTOL
from dc_app import load_pretrained
from dc_app.models import attention_kernel
from dc_app.models.attention import GEGLU, BasicTransformerBlock
from dc_app.models.attention_kernel import attention_backend, dot_product_attention
from dc_app.models.token_chunking import TokenChunking, parse_token_chunking
from tinyruns import STEPS, injected_draws, rel_l2, synthesize, unet_inputs

# Attention calls of one tiny-UNet forward with a per-frame image context: 7 spatial transformers x 3 (self,
# text, image), 7 temporal transformers x 2 (both self), init_attn x 2.
TINY_UNET_ATTENTION_CALLS = 7 * 3 + 7 * 2 + 2
TINY_UNET_BLOCKS = 7 + 7 + 1  # transformer blocks: 7 spatial, 7 temporal, init_attn


@pytest.fixture(scope="module")
def model():
    return load_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def draws() -> dict[str, torch.Tensor]:
    return injected_draws()


@pytest.fixture(scope="module")
def reference(model, draws) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 run with the default fast paths: SDPA, batched CFG, per-frame decode."""
    with attention_backend("sdpa"):
        latent, video = synthesize(model, draws)
    assert torch.isfinite(video).all()
    return latent, video


class CountSDPA:
    """Counts torch's SDPA calls (and their batch sizes) while active; results are unchanged."""

    def __init__(self, monkeypatch):
        self.batches: list[int] = []
        original = F.scaled_dot_product_attention

        def counting(q, *args, **kwargs):
            self.batches.append(q.shape[0])
            return original(q, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)


# ------------------------------------------------------------------------------------- SDPA vs plain math
def test_unet_sdpa_equals_math(model, monkeypatch):
    x, t, cond, fs = unet_inputs()
    counter = CountSDPA(monkeypatch)
    with torch.no_grad(), attention_backend("math"):
        plain = model.apply_model(x, t, cond, fs=fs)
    assert counter.batches == []  # the math backend really bypasses SDPA, in every attention of the UNet
    with torch.no_grad(), attention_backend("sdpa"):
        fast = model.apply_model(x, t, cond, fs=fs)
    assert len(counter.batches) == TINY_UNET_ATTENTION_CALLS  # and the sdpa backend reaches all of them
    torch.testing.assert_close(fast, plain, atol=ATOL, rtol=RTOL)


def test_vae_sdpa_equals_math(model, monkeypatch):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 4, 8, 8, generator=g)
    pixels = torch.rand(1, 3, 2, 64, 64, generator=g) * 2 - 1
    counter = CountSDPA(monkeypatch)
    with attention_backend("math"):
        plain_decode = model.decode_first_stage(z, chunk_size=4)
        plain_encode = model.encode_first_stage(pixels, sample=False)
    assert counter.batches == []
    with attention_backend("sdpa"):
        fast_decode = model.decode_first_stage(z, chunk_size=4)
        fast_encode = model.encode_first_stage(pixels, sample=False)
    # One mid-block attention in the decoder call (4 frames at once) and one in each per-frame encoder call.
    assert counter.batches == [4, 1, 1]
    torch.testing.assert_close(fast_decode, plain_decode, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fast_encode, plain_encode, atol=ATOL, rtol=RTOL)


def test_resampler_sdpa_equals_math(model, monkeypatch):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        tokens = model.embedder(images)  # open_clip's vision tower: not switched by our backend
        counter = CountSDPA(monkeypatch)
        with attention_backend("math"):
            plain = model.image_proj_model(tokens)
        assert counter.batches == []
        with attention_backend("sdpa"):
            fast = model.image_proj_model(tokens)
    assert counter.batches == [2, 2]  # one attention per Resampler layer (depth 2)
    assert fast.shape == (2, 16 * 4, 64)
    torch.testing.assert_close(fast, plain, atol=ATOL, rtol=RTOL)


def test_full_run_sdpa_equals_math(model, draws, reference):
    # Observed: max abs 1.8e-5 on latents of magnitude <= 4.5 (relative L2 3.9e-6).
    with attention_backend("math"):
        latent, video = synthesize(model, draws)
    torch.testing.assert_close(latent, reference[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(video, reference[1], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------- batched vs two-call CFG
def test_batched_cfg_equals_two_calls(model, draws, reference):
    calls = []
    apply_model = model.apply_model

    def recording(x, t, cond, **kw):
        calls.append(x.shape[0])
        return apply_model(x, t, cond, **kw)

    model.apply_model = recording
    try:
        latent, video = synthesize(model, draws, batched_cfg=False)
        two_call_batches = list(calls)
        calls.clear()
        synthesize(model, draws, batched_cfg=True)
    finally:
        del model.apply_model
    assert two_call_batches == [1] * (2 * STEPS) and calls == [2] * STEPS
    # Observed: max abs 1.7e-5 (relative L2 3.9e-6): batch-size-dependent GEMM blocking, nothing else.
    torch.testing.assert_close(latent, reference[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(video, reference[1], atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------ chunked VAE decode
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 8, 100])
def test_chunked_decode_equals_whole(model, chunk_size):
    z = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # 8 frames in all
    whole = model.decode_first_stage(z, chunk_size=8)
    chunked = model.decode_first_stage(z, chunk_size=chunk_size)
    assert chunked.shape == (2, 3, 4, 64, 64)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    # Frames stay in place: frame (1, 2) decoded on its own is the same frame of the chunked result.
    single = model.decode_first_stage(z[1:, :, 2:3], chunk_size=1)
    torch.testing.assert_close(chunked[1:, :, 2:3], single, atol=1e-5, rtol=1e-5)


def test_decode_chunk_size_in_the_pipeline(model, draws, reference):
    _, video = synthesize(model, draws, decode_chunk_size=4)  # the reference decodes frame by frame
    torch.testing.assert_close(video, reference[1], atol=1e-5, rtol=1e-5)


def test_decode_chunk_size_must_be_positive(model):
    with pytest.raises(ValueError, match="chunk_size"):
        model.decode_first_stage(torch.zeros(1, 4, 1, 8, 8), chunk_size=0)


# ------------------------------------------------------------------------------------------- CPU offload
def test_offload_on_cpu_gives_identical_results(draws, reference):
    model = load_pretrained("tiny", device="cpu").enable_offload(vae=True)
    latent, video = synthesize(model, draws)
    assert torch.equal(latent, reference[0]) and torch.equal(video, reference[1])
    for part in (model.cond_stage_model, model.embedder, model.image_proj_model, model.first_stage_model):
        assert all(p.device.type == "cpu" for p in part.parameters())


# ------------------------------------------------------------------------------- CUDA batch-split guard
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_splits_oversized_batches(monkeypatch, backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(13, 2, 7, 16, generator=g) for _ in range(3))
    k_shared, v_shared = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    with attention_backend(backend):
        whole = dot_product_attention(q, k, v)
        whole_shared = dot_product_attention(q, k_shared.expand(13, -1, -1, -1), v_shared.expand(13, -1, -1, -1))
        monkeypatch.setattr(attention_kernel, "MAX_KERNEL_BATCH", 5)
        # CUDA only in real use; CPU is listed here to force the split on this machine.
        monkeypatch.setattr(attention_kernel, "BATCH_LIMITED_DEVICES", frozenset({"cpu", "cuda"}))
        counter = CountSDPA(monkeypatch)
        split = dot_product_attention(q, k, v)
        split_shared = dot_product_attention(q, k_shared, v_shared)  # batch-1 k, v broadcast to every chunk
    if backend == "sdpa":
        assert counter.batches == [5, 5, 3, 5, 5, 3]
    assert split.shape == whole.shape == (13, 2, 7, 16)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(split_shared, whole_shared, atol=1e-6, rtol=1e-6)


def test_attention_split_leaves_small_batches_and_cpu_alone(monkeypatch):
    q = torch.randn(13, 2, 7, 16)
    counter = CountSDPA(monkeypatch)
    monkeypatch.setattr(attention_kernel, "MAX_KERNEL_BATCH", 5)
    with attention_backend("sdpa"):
        dot_product_attention(q, q, q)  # CPU is not batch-limited by default
        monkeypatch.setattr(attention_kernel, "BATCH_LIMITED_DEVICES", frozenset({"cpu"}))
        dot_product_attention(q[:5], q[:5], q[:5])  # at the limit: one call
    assert counter.batches == [13, 5]


def test_unet_with_forced_batch_split_equals_unsplit(model, monkeypatch):
    x, t, cond, fs = unet_inputs()
    with torch.no_grad():
        whole = model.apply_model(x, t, cond, fs=fs)
        # Temporal attention runs b*h*w = 2*8*8 = 128 sequences at full resolution: split into 50, 50, 28.
        monkeypatch.setattr(attention_kernel, "MAX_KERNEL_BATCH", 50)
        monkeypatch.setattr(attention_kernel, "BATCH_LIMITED_DEVICES", frozenset({"cpu"}))
        counter = CountSDPA(monkeypatch)
        split = model.apply_model(x, t, cond, fs=fs)
    assert max(counter.batches) <= 50 and len(counter.batches) > TINY_UNET_ATTENTION_CALLS
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ half precision
# Observed on CPU (10 steps, CFG 7.5, rescale 0.7), relative L2 error against the float32 run:
#   float16:  final latent 6.9e-3 (max abs 3.1e-2), video 7.2e-3 (max abs 2.7e-2);
#   bfloat16: final latent 4.9e-2 (max abs 0.23),   video 4.9e-2 (max abs 0.18).
# Bounds are about 3x those. Another draw of the step noise (another sample of the same prompt and image)
# moves the result by 1.3 (checked below), so the bounds separate "the same video, rounded" from "another
# video". (x_T hardly matters here: with zero terminal SNR and eta = 1 the step noise dominates.)
HALF_BOUNDS = {torch.float16: 0.025, torch.bfloat16: 0.15}


@pytest.mark.parametrize("dtype", list(HALF_BOUNDS), ids=["float16", "bfloat16"])
def test_half_precision_run_close_to_float32(draws, reference, dtype):
    model = load_pretrained("tiny", device="cpu").set_dtype(dtype)
    assert model.dtype == dtype and model.model.diffusion_model.dtype == dtype
    assert all(p.dtype == dtype for p in model.cond_stage_model.parameters())
    assert all(p.dtype == dtype for p in model.image_proj_model.parameters())
    # The VAE stays float32 unless asked, and the schedule stays float32 whatever the network dtype.
    assert model.vae_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.first_stage_model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32 and model.scale_arr.dtype == torch.float32

    latent, video = synthesize(model, draws)
    assert latent.dtype == torch.float32 and video.dtype == torch.float32
    assert torch.isfinite(latent).all() and torch.isfinite(video).all()
    bound = HALF_BOUNDS[dtype]
    errors = rel_l2(latent, reference[0]), rel_l2(video, reference[1])
    assert max(errors) < bound, f"{dtype}: relative L2 error latent {errors[0]:.3e}, video {errors[1]:.3e}"


def test_half_precision_bound_is_meaningful(model, draws, reference):
    latent, _ = synthesize(model, draws, variance_noise=draws["variance_noise_other"])
    assert rel_l2(latent, reference[0]) > 3 * max(HALF_BOUNDS.values())


def test_half_precision_decodes_in_float32(model):
    """The float32 VAE of a half-precision model decodes exactly as the float32 model does."""
    half = load_pretrained("tiny", device="cpu").set_dtype(torch.bfloat16)
    z = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(half.decode_first_stage(z), model.decode_first_stage(z))
    # A VAE dtype of its own, when asked for; the decoded pixels come back as float32 either way.
    half.set_dtype(torch.bfloat16, vae_dtype=torch.bfloat16)
    assert half.vae_dtype == torch.bfloat16
    pixels = half.decode_first_stage(z)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()


# ------------------------------------------------------------------------------- chunked transformer blocks
class RecordFeedForwardRows:
    """Rows (tokens) of every GEGLU call, and rows (sequences) of every block call, while active."""

    def __init__(self, model, monkeypatch):
        self.ff_tokens: list[int] = []
        self.block_sequences: list[int] = []
        for module in model.model.diffusion_model.modules():
            if isinstance(module, GEGLU):
                module.register_forward_pre_hook(lambda m, args: self.ff_tokens.append(args[0].numel()
                                                                                       // args[0].shape[-1]))
        original = BasicTransformerBlock._block

        def recording(block, x, context, chunk_tokens):
            self.block_sequences.append(x.shape[0])
            return original(block, x, context, chunk_tokens)

        monkeypatch.setattr(BasicTransformerBlock, "_block", recording)


@pytest.fixture
def chunked_model():
    return load_pretrained("tiny", device="cpu")  # a model of its own: the chunking is its state


# The tiny UNet's longest token runs: init_attn over b*h*w = 2*8*8 = 128 sequences of 4 frames (512 tokens),
# spatial blocks over 2*4 = 8 frames of 64 positions (512 tokens). Chunks of 1 (per token), 7 (shorter than a
# spatial sequence), 64 (one spatial sequence) and 200 (a few sequences, a ragged last chunk).
@pytest.mark.parametrize("tokens", [1, 7, 64, 200])
def test_chunked_unet_equals_unchunked(chunked_model, monkeypatch, tokens):
    x, t, cond, fs = unet_inputs()
    with torch.no_grad():
        whole = chunked_model.apply_model(x, t, cond, fs=fs)
        chunked_model.set_ff_chunk_size(tokens=tokens)
        rows = RecordFeedForwardRows(chunked_model, monkeypatch)
        chunked = chunked_model.apply_model(x, t, cond, fs=fs)
    # Every feed-forward saw at most `tokens` tokens, and the blocks ran on whole sequences, several calls each.
    assert max(rows.ff_tokens) <= tokens and max(rows.block_sequences) < 2 * 8 * 8
    assert len(rows.block_sequences) > TINY_UNET_BLOCKS  # more block calls than blocks: the chunks are real
    # Observed: max abs 3.1e-6 at 1 token, 0 from 16 tokens up (GEMM blocking changes with the row count).
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_chunking_by_memory_budget(chunked_model, monkeypatch):
    x, t, cond, fs = unet_inputs()
    with torch.no_grad():
        whole = chunked_model.apply_model(x, t, cond, fs=fs)
        # Widest tiny block: 64 channels -> feed-forward temporaries 16 * 64 * 4 bytes = 4 KiB per token (fp32).
        chunked_model.set_ff_chunk_size(budget_bytes=40 * 1024)
        rows = RecordFeedForwardRows(chunked_model, monkeypatch)
        chunked = chunked_model.apply_model(x, t, cond, fs=fs)
    assert str(chunked_model.ff_chunking) == "0.0390625 MiB budget"
    assert max(rows.ff_tokens) <= 10 * 64 // 32  # the narrowest block (32 channels) gets 2x the tokens
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_chunking_off_again_restores_whole_calls(chunked_model, monkeypatch):
    x, t, cond, fs = unet_inputs()
    chunked_model.set_ff_chunk_size(tokens=7)
    chunked_model.set_ff_chunk_size()
    assert chunked_model.ff_chunking is None
    rows = RecordFeedForwardRows(chunked_model, monkeypatch)
    with torch.no_grad():
        chunked_model.apply_model(x, t, cond, fs=fs)
    assert len(rows.block_sequences) == TINY_UNET_BLOCKS and max(rows.ff_tokens) == 2 * 4 * 8 * 8


def test_full_run_with_chunking_equals_reference(draws, reference, chunked_model):
    chunked_model.set_ff_chunk_size(tokens=48)
    latent, video = synthesize(chunked_model, draws)
    torch.testing.assert_close(latent, reference[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(video, reference[1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("text, expected", [
    ("4096", TokenChunking(tokens=4096)), (" 1 ", TokenChunking(tokens=1)),
    ("64MiB", TokenChunking(budget_bytes=64 * 2**20)), ("0.5GB", TokenChunking(budget_bytes=500_000_000)),
    ("200 mb", TokenChunking(budget_bytes=200_000_000)), ("1KiB", TokenChunking(budget_bytes=1024)),
])
def test_parse_token_chunking(text, expected):
    assert parse_token_chunking(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "lots", "64 parsecs", "1.5", "", "0MB", "4096 tokens"])
def test_parse_token_chunking_refuses(text):
    with pytest.raises(ValueError, match="expected a number of tokens .* or a memory budget"):
        parse_token_chunking(text)


def test_token_chunking_budget_per_block():
    budget = TokenChunking(budget_bytes=2**20)
    assert budget.tokens_for(width=512, element_size=2) == 2**20 // (16 * 512 * 2) == 64
    assert budget.tokens_for(width=10**6, element_size=4) == 1  # never zero tokens
    assert TokenChunking(tokens=300).tokens_for(width=512, element_size=2) == 300
    with pytest.raises(ValueError):
        TokenChunking(tokens=3, budget_bytes=5)
    with pytest.raises(ValueError):
        TokenChunking()
