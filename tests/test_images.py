"""dc_app.images: every accepted kind of upload is converted correctly; every bad one is refused in words."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dc_app import images
from dc_app.images import MAX_FILE_BYTES, MAX_PIXELS, MAX_SIDE, prepare_image
from dc_app.validation import InputError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def rgb_at(t: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    """Pixel (y, x) of a (3, H, W) tensor in [-1, 1] as 0..255 integers."""
    return tuple(int(round((float(v) + 1) * 127.5)) for v in t[:, y, x])


def close(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


# ---------------------------------------------------------------------------------------------- accepted


def test_pillow_limits_are_set_explicitly():
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_rgb_png_becomes_model_tensor(tmp_path):
    t = prepare_image(save(Image.new("RGB", (90, 50), RED), tmp_path / "a.png"), 64, 96)
    assert t.shape == (3, 64, 96) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.ones(64, 96)) and torch.allclose(t[1:], -torch.ones(2, 64, 96))


def test_landscape_keeps_the_centre(tmp_path):
    # Three vertical bands; a square crop of a 3:1 image keeps the middle band only.
    img = Image.new("RGB", (300, 100), RED)
    img.paste(Image.new("RGB", (100, 100), BLUE), (100, 0))
    t = prepare_image(save(img, tmp_path / "bands.png"), 32, 32)
    assert close(rgb_at(t, 16, 1), BLUE) and close(rgb_at(t, 16, 30), BLUE)


def test_portrait_on_landscape_model_has_no_black_bars(tmp_path):
    # Upstream's resize-short-side + centre-crop pads this case with black; dc_app scales to cover instead.
    t = prepare_image(save(Image.new("RGB", (50, 200), WHITE), tmp_path / "tall.png"), 40, 64)
    assert t.min() > 0.95


def test_rgba_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))          # fully transparent red
    img.paste(Image.new("RGBA", (10, 20), (0, 0, 255, 255)), (0, 0))  # opaque blue left half
    t = prepare_image(save(img, tmp_path / "a.png"), 20, 20)
    assert close(rgb_at(t, 10, 2), BLUE) and close(rgb_at(t, 10, 17), WHITE)


def test_half_transparent_is_blended_over_white(tmp_path):
    t = prepare_image(save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "a.png"), 8, 8)
    assert close(rgb_at(t, 4, 4), (127, 127, 127), tol=2)


def test_la_mode(tmp_path):
    t = prepare_image(save(Image.new("LA", (8, 8), (0, 255)), tmp_path / "a.png"), 8, 8)
    assert close(rgb_at(t, 4, 4), (0, 0, 0))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    path = save(img, tmp_path / "p.png", transparency=0)
    assert close(rgb_at(prepare_image(path, 10, 10), 5, 5), WHITE)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    assert close(rgb_at(prepare_image(save(img, tmp_path / "p.png"), 10, 10), 5, 5), (0, 255, 0))


def test_grayscale_and_bilevel(tmp_path):
    assert close(rgb_at(prepare_image(save(Image.new("L", (8, 8), 200), tmp_path / "l.png"), 8, 8), 1, 1),
                 (200, 200, 200))
    assert close(rgb_at(prepare_image(save(Image.new("1", (8, 8), 1), tmp_path / "b.png"), 8, 8), 1, 1), WHITE)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # Pillow's own I;16 -> L conversion clips at 255, which would make this mid-grey image white.
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    assert close(rgb_at(prepare_image(path, 8, 8), 4, 4), (128, 128, 128), tol=1)


def test_32_bit_integer_and_float_modes(tmp_path):
    i32 = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32))
    assert close(rgb_at(prepare_image(i32, 8, 8), 0, 0), WHITE)
    f32 = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert close(rgb_at(prepare_image(f32, 8, 8), 0, 0), (128, 128, 128), tol=1)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "c.jpg", quality=95)  # pure cyan
    assert Image.open(path).mode == "CMYK"
    r, g, b = rgb_at(prepare_image(path, 16, 16), 8, 8)
    assert r < 40 and g > 215 and b > 215


def test_multi_picture_jpeg_uses_first_picture(tmp_path):
    path = tmp_path / "stereo.mpo"
    Image.new("RGB", (16, 16), RED).save(path, format="MPO", save_all=True,
                                         append_images=[Image.new("RGB", (16, 16), BLUE)])
    assert Image.open(path).format == "MPO"
    assert close(rgb_at(prepare_image(str(path), 16, 16), 8, 8), RED, tol=6)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert close(rgb_at(prepare_image(str(path), 10, 10), 5, 5), RED, tol=8)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40x20, left red / right blue; orientation 6 means "rotate 90 degrees clockwise to display",
    # so the upright picture is 20x40 with red on top.
    img = Image.new("RGB", (40, 20), RED)
    img.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    t = prepare_image(path, 40, 20)
    assert close(rgb_at(t, 2, 10), RED, tol=12) and close(rgb_at(t, 37, 10), BLUE, tol=12)


def test_broken_exif_is_ignored(tmp_path):
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / "e.jpg", exif=b"Exif\x00\x00garbage", quality=95)
    assert close(rgb_at(prepare_image(path, 8, 8), 4, 4), RED, tol=6)


def test_one_pixel_image_becomes_flat_colour(tmp_path):
    t = prepare_image(save(Image.new("RGB", (1, 1), (10, 200, 30)), tmp_path / "one.png"), 40, 64)
    assert t.shape == (3, 40, 64)
    assert close(rgb_at(t, 0, 0), (10, 200, 30)) and close(rgb_at(t, 39, 63), (10, 200, 30))


def test_extreme_aspect_ratio_is_accepted_without_a_huge_intermediate(tmp_path):
    # Resizing the short side of a 4000x1 strip to 320 first would make a 1.28-million-pixel-wide image.
    strip = Image.new("RGB", (4000, 1), RED)
    strip.paste(Image.new("RGB", (10, 1), BLUE), (1995, 0))
    t = prepare_image(save(strip, tmp_path / "strip.png"), 320, 512)
    assert t.shape == (3, 320, 512)
    assert rgb_at(t, 160, 256)[2] > 100  # the centre (blue) is what is kept


def test_numpy_inputs():
    u8 = np.zeros((10, 12, 3), dtype=np.uint8)
    u8[..., 1] = 255
    assert close(rgb_at(prepare_image(u8, 10, 12), 5, 5), (0, 255, 0))
    assert close(rgb_at(prepare_image(np.full((4, 4), 0.5, dtype=np.float32), 4, 4), 0, 0), (128, 128, 128), 1)
    assert close(rgb_at(prepare_image(np.full((4, 4, 1), 65535, dtype=np.uint16), 4, 4), 0, 0), WHITE)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black
    assert close(rgb_at(prepare_image(rgba, 4, 4), 0, 0), WHITE)
    assert close(rgb_at(prepare_image(np.ones((4, 4), dtype=bool), 4, 4), 0, 0), WHITE)


def test_pil_image_and_gradio_payload(tmp_path):
    img = Image.new("RGB", (8, 8), BLUE)
    assert close(rgb_at(prepare_image(img, 8, 8), 1, 1), BLUE)
    path = save(img, tmp_path / "x.png")
    assert close(rgb_at(prepare_image({"path": path, "meta": {"_type": "gradio.FileData"}}, 8, 8), 1, 1), BLUE)


def test_file_is_closed_after_reading(tmp_path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img = images.open_image(str(path))
    assert getattr(img, "fp", None) is None  # a detached copy: animations would otherwise keep the fd open


# ---------------------------------------------------------------------------------------------- refused


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (what a decompression bomb's header looks like)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def expect_reject(source, fragment: str, field: str = "image"):
    with pytest.raises(InputError) as err:
        prepare_image(source, 64, 64, field=field)
    assert str(err.value).startswith(f"{field}: "), err.value
    assert fragment in str(err.value), err.value


def test_nothing_given():
    expect_reject(None, "no image was given")
    expect_reject("", "no image was given")


def test_missing_file(tmp_path):
    expect_reject(str(tmp_path / "nope.png"), "file not found")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just text, despite the name")
    expect_reject(str(path), "not an image file")


def test_formats_outside_the_list_are_refused(tmp_path):
    # Pillow can read EPS, through Ghostscript: an upload must never start an interpreter.
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    expect_reject(str(path), "not an image file")


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect_reject(str(path), "truncated or damaged", field="image2")


def test_decompression_bomb_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_size(100_000, 100_000))
    expect_reject(str(path), "megapixels")


def test_too_many_pixels_below_pillows_own_limit(tmp_path):
    # 6400 x 6400 = 41 MP: over dc_app's 40 MP, under Pillow's 2x-limit error, so only dc_app's check stops it.
    path = tmp_path / "big.png"
    path.write_bytes(png_with_size(6400, 6400))
    expect_reject(str(path), "too large")


def test_side_too_long(tmp_path):
    path = tmp_path / "long.png"
    path.write_bytes(png_with_size(MAX_SIDE + 1, 1))
    expect_reject(str(path), f"each side must be from 1 to {MAX_SIDE}")


def test_file_too_big(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:  # sparse: costs no disk
        f.truncate(MAX_FILE_BYTES + 1)
    expect_reject(str(path), "the limit is 50 MB")


def test_bad_arrays_and_types():
    expect_reject(np.zeros((4, 4, 2), dtype=np.uint8), "expected an array of shape")
    expect_reject(np.full((4, 4), np.nan, dtype=np.float32), "NaN")
    expect_reject(np.zeros((4, 4), dtype=np.int64), "uint8, uint16, float or bool")
    expect_reject(12345, "expected an image file, got a int")
    expect_reject({"url": "http://example.com/a.png"}, "has no path")
