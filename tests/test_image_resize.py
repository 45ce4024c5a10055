"""dc_app.images resizing: upstream's picture where the geometry agrees, the intended differences, any size.

Upstream (scripts/evaluation/inference.py) prepares an image with torchvision: Resize(min(h, w)) of the PIL
image (bilinear, antialiased), CenterCrop((h, w)), ToTensor, Normalize(0.5, 0.5). dc_app scales to cover the
frame instead and takes the exact centre (see `cover_crop`). The tests below compare against two independent
expectations, computed here:

* upstream's transform itself, where both geometries are the same (landscape images whose resized size is
  whole);
* a float64 antialiased bilinear resample of the exact centre at the cover scale, written plainly (a
  triangle filter, widened when shrinking), for the sizes where dc_app differs from upstream on purpose.

Tolerance: one 8-bit level. Every image starts from 8-bit pixels and dc_app's output is 8-bit; a filter
change moves values by many levels on a textured image (bicubic: 19 to 32 levels here), a constant-colour or
wide-band image would show nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dc_app.loading.spec import MODEL_NAMES, load_model_config
from dc_app.images import MAX_PIXELS, MAX_SIDE, cover_crop, prepare_image


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Waves of several periods per channel plus per-pixel noise: detail at every scale, so any change of
    filter or a one-pixel shift shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    waves = np.stack([np.sin(x / 7 + y / 11), np.cos(x / 5 - y / 3), np.sin(x * y / 500)], axis=-1)
    noise = np.random.default_rng(seed).integers(-20, 21, size=(height, width, 3))
    return Image.fromarray(np.clip(128 + 100 * waves + noise, 0, 255).astype(np.uint8))


def upstream_preprocess(img: Image.Image, height: int, width: int, short_side: int | None = None) -> torch.Tensor:
    """Upstream's transform; `short_side` replaces min(height, width) to scale a portrait image to cover."""
    return transforms.Compose([
        transforms.Resize(short_side or min(height, width)),
        transforms.CenterCrop((height, width)),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])(img)


def triangle_weights(n_in: int, n_out: int, start: float, length: float) -> np.ndarray:
    """(n_out, n_in) weights resampling the source span [start, start + length) onto n_out pixels: a triangle
    of half-width one output pixel in source units (at least one source pixel), normalised per row."""
    step = length / n_out
    half_width = max(step, 1.0)
    centres = start + (np.arange(n_out) + 0.5) * step  # pixel centres, in continuous source coordinates
    sources = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(sources[None, :] - centres[:, None]) / half_width, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def exact_centre_cover(img: Image.Image, height: int, width: int) -> np.ndarray:
    """(3, height, width) 8-bit levels, float64: the image scaled by max(width / W, height / H) (the same on
    both axes), the frame cut from the exact centre, antialiased bilinear, no rounding anywhere."""
    w_in, h_in = img.size
    scale = max(width / w_in, height / h_in)
    span_w, span_h = width / scale, height / scale
    rows = triangle_weights(h_in, height, (h_in - span_h) / 2, span_h)
    cols = triangle_weights(w_in, width, (w_in - span_w) / 2, span_w)
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    return np.stack([rows @ pixels[:, :, c] @ cols.T for c in range(3)])


def levels(t: torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] as 8-bit levels (0..255), float64."""
    return (t.double().numpy() + 1.0) * 127.5


def max_level_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# One 8-bit level, plus float32 rounding of x / 127.5 - 1 in both pipelines.
ONE_LEVEL = 1.0 + 1e-4


# ------------------------------------------------------------------ upstream's geometry: upstream's picture


@pytest.mark.parametrize("size, frame", [
    ((900, 400), (320, 512)),   # 512 model: 720x320 after the resize
    ((900, 400), (64, 96)),
    ((900, 400), (256, 256)),   # 256 model: 576x256
    ((900, 400), (64, 64)),     # tiny model
    ((900, 400), (576, 1024)),  # 1024 model: 1296x576 (one level off in 1.5 % of the values)
])
def test_landscape_images_match_upstreams_transform(size, frame):
    (w_in, h_in), (height, width) = size, frame
    assert (w_in * min(height, width)) % h_in == 0  # the resized size is whole: both geometries agree
    img = textured(w_in, h_in)
    ours = levels(prepare_image(img, height, width))
    assert max_level_difference(ours, levels(upstream_preprocess(img, height, width))) <= ONE_LEVEL
    # the same picture by the plain reference (it stands for the geometry of the tests below)
    assert max_level_difference(ours, exact_centre_cover(img, height, width)) <= ONE_LEVEL


# --------------------------------------------------------------------- where dc_app differs on purpose


@pytest.mark.parametrize("size", [(400, 900), (500, 500)], ids=["portrait", "square"])
@pytest.mark.parametrize("frame", [(320, 512), (576, 1024)], ids=["512", "1024"])
def test_portrait_and_square_images_cover_a_landscape_frame_without_bars(size, frame):
    """Upstream scales the short side to the frame's short side and pads the rest with black; dc_app scales
    the image to cover the frame: upstream's own steps with the short side scaled to the frame's width."""
    (w_in, h_in), (height, width) = size, frame
    img = textured(w_in, h_in)
    ours = prepare_image(img, height, width)
    black_columns = (upstream_preprocess(img, height, width) == -1).all(dim=0).all(dim=0)
    # upstream: the image's width becomes the frame's height, the rest is black, half on each side
    assert int(black_columns.sum()) == width - height and bool(black_columns[: (width - height) // 2].all())
    assert not bool((ours == -1).all(dim=0).all(dim=0).any())         # dc_app: none
    covering = upstream_preprocess(img, height, width, short_side=width)
    assert max_level_difference(levels(ours), levels(covering)) <= ONE_LEVEL
    assert max_level_difference(levels(ours), exact_centre_cover(img, height, width)) <= ONE_LEVEL


@pytest.mark.parametrize("size, frame", [
    ((1000, 600), (320, 512)),   # resized 533.33 x 320: upstream truncates to 533 and rounds the crop offset
    ((1280, 720), (256, 256)),   # 455.11 x 256
    ((2000, 1000), (576, 1024)),
    ((49, 31), (320, 512)),      # upscaled, width decides
    ((123, 457), (64, 64)),
])
def test_any_size_is_scaled_exactly_and_cut_from_the_exact_centre(size, frame):
    (w_in, h_in), (height, width) = size, frame
    img = textured(w_in, h_in)
    ours = levels(prepare_image(img, height, width))
    assert max_level_difference(ours, exact_centre_cover(img, height, width)) <= ONE_LEVEL


def test_non_whole_resize_differs_from_upstream_by_a_pixel_shift():
    """The reason for the test above: where the resized size is not whole, upstream's picture is shifted and
    stretched by up to a pixel, which on fine detail is a large difference (here up to 0.74 on [-1, 1])."""
    img = textured(1000, 600)
    shift = max_level_difference(levels(prepare_image(img, 320, 512)), levels(upstream_preprocess(img, 320, 512)))
    assert shift > 64  # levels: far beyond one level, so the exact-centre test cannot pass by accident


# ----------------------------------------------------------------------------------------- any size works


def model_frames() -> list[tuple[int, int]]:
    """(height, width) in pixels of every model dc_app ships: the latent size times 8 (the VAE's factor)."""
    frames = set()
    for name in MODEL_NAMES:
        h, w = (int(v) for v in load_model_config(name).model.params.image_size)
        frames.add((8 * h, 8 * w))
    return sorted(frames)


def sizes_to_try(count: int, seed: int) -> list[tuple[int, int]]:
    """Sizes that crashed before the crop box was clamped, the extremes, and random sizes: each side
    log-uniform in 1..MAX_SIDE (mostly small, every aspect ratio), within MAX_PIXELS."""
    rng = np.random.default_rng(seed)
    largest_square = int(MAX_PIXELS**0.5)
    sizes = [(49, 31), (2000, 1000), (1, 1), (1, MAX_SIDE), (MAX_SIDE, 1),
             (MAX_SIDE, MAX_PIXELS // MAX_SIDE), (MAX_PIXELS // MAX_SIDE, MAX_SIDE), (largest_square, largest_square)]
    while len(sizes) < count:
        w, h = (int(v) for v in np.exp(rng.uniform(0, np.log(MAX_SIDE + 1), size=2)))
        if w * h <= MAX_PIXELS:
            sizes.append((w, h))
    return sizes


def test_cover_crop_gives_the_exact_frame_for_any_accepted_size():
    """Float rounding of the crop box once made Pillow raise for ~5 % of sizes (49x31 -> 320x512,
    2000x1000 -> 576x1024). Every accepted size, every model's frame: no exception, the exact frame size."""
    frames = model_frames()
    assert (320, 512) in frames and (576, 1024) in frames and (256, 256) in frames
    for w_in, h_in in sizes_to_try(200, seed=15):
        img = Image.new("RGB", (w_in, h_in), (10, 200, 30))
        for height, width in frames:
            out = cover_crop(img, height, width)
            assert (out.size, out.mode) == ((width, height), "RGB"), ((w_in, h_in), (height, width))
