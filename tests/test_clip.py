"""OpenCLIP text/image embedders against upstream's tiny-model outputs, and key parity for the real ViT-H-14."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ATOL, ATOL_LARGE_IMAGE, RTOL, read_manifest, strip_prefix
from dc_app.loading.spec import load_model_config
from dc_app.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    OpenCLIPImageEmbedder,
    OpenCLIPTextEmbedder,
    antialiased_resize,
)

TEXT_PREFIX, IMAGE_PREFIX = "cond_stage_model.", "embedder."
SOT, EOT = 49406, 49407


def _tiny_embedder(cls, config_key: str, meta: bool):
    cfg = load_model_config("tiny")
    kwargs = dict(cfg.model.params[config_key].params, model_cfgs=cfg.open_clip_model_cfgs)
    with torch.device("meta" if meta else "cpu"):
        return cls(**kwargs)


def tiny_text(meta: bool = False) -> OpenCLIPTextEmbedder:
    return _tiny_embedder(OpenCLIPTextEmbedder, "cond_stage_config", meta)


def tiny_image(meta: bool = False) -> OpenCLIPImageEmbedder:
    return _tiny_embedder(OpenCLIPImageEmbedder, "img_cond_stage_config", meta)


@pytest.fixture(scope="module")
def text(tiny_weights) -> OpenCLIPTextEmbedder:
    model = tiny_text()
    model.load_state_dict(strip_prefix(tiny_weights, TEXT_PREFIX), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def image(tiny_weights) -> OpenCLIPImageEmbedder:
    model = tiny_image()
    model.load_state_dict(strip_prefix(tiny_weights, IMAGE_PREFIX), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Text


def test_tokens_match_reference(text, cases):
    tokens = text.tokenize(["a cat", ""])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 77)
    assert torch.equal(tokens, cases["text_tokens"])


def test_text_cond_matches_reference(text, cases):
    with torch.no_grad():
        cond = text(["a cat", ""])
    assert cond.shape == (2, 77, 64)
    torch.testing.assert_close(cond, cases["text_cond"], atol=ATOL, rtol=RTOL)


def test_long_prompt_is_truncated_like_reference(text, cases, cases_meta):
    prompt = cases_meta["meta"]["long_prompt"]
    tokens = text.tokenize([prompt])
    assert torch.equal(tokens, cases["text_tokens_long"])
    assert tokens[0, 0] == SOT and tokens[0, 76] == EOT
    assert text.is_truncated(prompt) and text.num_tokens(prompt) > 77
    assert not text.is_truncated("a cat") and text.num_tokens("a cat") == 4  # SOT, a, cat, EOT
    with torch.no_grad():
        cond = text([prompt])
    torch.testing.assert_close(cond, cases["text_cond_long"], atol=ATOL, rtol=RTOL)


def test_truncation_boundary(text):
    # 75 words of one token each fill the context exactly (SOT + 75 + EOT = 77); one more word is cut.
    fits, cut = " ".join(["cat"] * 75), " ".join(["cat"] * 76)
    assert text.num_tokens(fits) == 77 and not text.is_truncated(fits)
    assert text.num_tokens(cut) == 78 and text.is_truncated(cut)
    assert text.tokenize(fits)[0, 76] == EOT


def test_text_rejects_bad_input(text):
    with pytest.raises(ValueError, match="expected a string"):
        text.tokenize(["ok", 3])
    with pytest.raises(ValueError, match="expected"):
        text.encode_tokens(torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="text layer"):
        OpenCLIPTextEmbedder(layer="pooled")


# ---------------------------------------------------------------------------------------------------------
# Image


def test_image_embed_matches_reference(image, cases):
    with torch.no_grad():
        tokens = image(cases["image_in"])
    assert tokens.shape == (2, 50, 64)  # class token + 7x7 patches
    torch.testing.assert_close(tokens, cases["image_embed"], atol=ATOL, rtol=RTOL)


def test_large_image_preprocess_and_embed_match_reference(image, cases):
    # 320x256 -> 224x224 shrinks both sides: the antialias blur is active.
    with torch.no_grad():
        pre = image.preprocess(cases["image_large_in"])
        tokens = image(cases["image_large_in"])
    torch.testing.assert_close(pre, cases["image_large_preprocessed"], atol=ATOL_LARGE_IMAGE, rtol=RTOL)
    torch.testing.assert_close(tokens, cases["image_large_embed"], atol=ATOL_LARGE_IMAGE, rtol=RTOL)


def test_upscaling_does_not_blur(image, cases):
    x = cases["image_in"]
    plain = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=True)
    torch.testing.assert_close(antialiased_resize(x, (224, 224)), plain, atol=0, rtol=0)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(image.preprocess(x), ((plain + 1) / 2 - mean) / std)


def test_same_size_is_untouched():
    x = torch.randn(1, 3, 224, 224)
    assert antialiased_resize(x, (224, 224)) is x


def test_image_rejects_bad_input(image):
    with pytest.raises(ValueError, match="expected"):
        image(torch.zeros(1, 4, 64, 64))


# ---------------------------------------------------------------------------------------------------------
# Precision, meta builds, checkpoint keys


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_float32(text, image, cases, dtype):
    t, i = tiny_text(), tiny_image()
    t.load_state_dict(text.state_dict())
    i.load_state_dict(image.state_dict())
    t, i = t.to(dtype).eval(), i.to(dtype).eval()
    with torch.no_grad():
        cond = t(["a cat", ""])
        tokens = i(cases["image_large_in"].to(dtype))
    assert cond.dtype == dtype and tokens.dtype == dtype
    torch.testing.assert_close(cond.float(), cases["text_cond"], atol=0.15, rtol=0.05)
    torch.testing.assert_close(tokens.float(), cases["image_large_embed"], atol=0.2, rtol=0.05)


def test_meta_build_assign_and_reset_reproduce_reference(tiny_weights, cases):
    text, image = tiny_text(meta=True), tiny_image(meta=True)
    text.load_state_dict(strip_prefix(tiny_weights, TEXT_PREFIX), strict=True, assign=True)
    image.load_state_dict(strip_prefix(tiny_weights, IMAGE_PREFIX), strict=True, assign=True)
    # Non-persistent buffers are not in the checkpoint, so they are still on meta after loading.
    assert text.model.attn_mask.is_meta and image.mean.is_meta
    with pytest.raises(RuntimeError, match="reset_nonpersistent_buffers"):
        text(["a cat"])
    with pytest.raises(RuntimeError, match="reset_nonpersistent_buffers"):
        image(cases["image_in"])
    text.reset_nonpersistent_buffers()
    image.reset_nonpersistent_buffers()
    assert not any(b.is_meta for b in [*text.buffers(), *image.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(text(["a cat", ""]), cases["text_cond"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(image(cases["image_in"]), cases["image_embed"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(image(cases["image_large_in"]), cases["image_large_embed"],
                                   atol=ATOL_LARGE_IMAGE, rtol=RTOL)


def _assert_matches_manifest(module: torch.nn.Module, name: str, prefix: str) -> None:
    rows = [row for row in read_manifest(name) if row[0].startswith(prefix)]
    expected = [(k[len(prefix):], shape) for k, shape, _ in rows]
    got = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    assert got == expected  # same keys, shapes and state_dict order
    assert all(kind == "param" for _, _, kind in rows)


@pytest.mark.parametrize("name", ["512", "256"])
def test_real_text_embedder_meta_build_matches_manifest(name):
    params = load_model_config(name).model.params.cond_stage_config.params
    with torch.device("meta"):
        text = OpenCLIPTextEmbedder(**params)  # no arch in the yaml: ViT-H-14
    _assert_matches_manifest(text, name, TEXT_PREFIX)
    assert text.context_length == 77 and len(text.model.transformer.resblocks) == 24
    # The causal mask is rebuilt, not loaded: it must stay out of the state_dict.
    text.reset_nonpersistent_buffers(device="cpu")
    assert text.model.attn_mask.shape == (77, 77) and text.model.attn_mask.device.type == "cpu"
    assert "model.attn_mask" not in text.state_dict()


@pytest.mark.parametrize("name", ["512", "256"])
def test_real_image_embedder_meta_build_matches_manifest(name):
    params = load_model_config(name).model.params.img_cond_stage_config.params
    with torch.device("meta"):
        image = OpenCLIPImageEmbedder(**params)
    _assert_matches_manifest(image, name, IMAGE_PREFIX)
    assert image.image_size == (224, 224)
    assert not {"mean", "std", "model.attn_mask"} & set(image.state_dict())


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="not in the config"):
        OpenCLIPTextEmbedder(arch="no-such-arch")
    with pytest.raises(ValueError, match="bundled model name"):
        OpenCLIPImageEmbedder(arch="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
