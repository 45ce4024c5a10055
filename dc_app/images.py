"""Uploaded images -> the model's input: checked, decoded safely, oriented, converted to RGB, resized and cropped.

What is accepted (each case has one outcome; see SECURITY.md):
* a file path, a Gradio file payload ({"path": ...}), a PIL image or a numpy array (H, W[, 1|3|4]);
* PNG, JPEG (incl. CMYK and MPO), GIF (first frame of an animation), WebP, BMP and TIFF only. Other formats
  Pillow could open are refused: EPS, for one, would run Ghostscript on the upload;
* modes RGB, RGBA, LA, P/PA (with or without transparency), L, 1, I;16, I, F, CMYK, YCbCr; transparent
  pixels are laid over white;
* EXIF orientation is applied (a broken EXIF block is ignored: the pixels are still fine);
* 1x1 and extreme aspect ratios are accepted: the picture is scaled to cover the model's frame and the centre
  is cut out, so a 1x1 image becomes one flat colour and a 1x4000 strip keeps its middle.
Refused with a message naming the field: nothing given, a missing file, not an image, a truncated or damaged
file, a file over MAX_FILE_BYTES, a side over MAX_SIDE or more than MAX_PIXELS pixels (decompression bombs).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .validation import InputError

MAX_FILE_BYTES = 50 * 1024 * 1024   # the app's upload limit (launch(max_file_size=...)) is the same
MAX_SIDE = 8192                     # pixels on either side
MAX_PIXELS = 40_000_000             # 40 MP: a 4:3 photo from any current phone fits; decoded RGB is 120 MB

# Pillow's own limits are process-wide; set them here, explicitly, for every decoder in the process (Gradio's
# included). Above MAX_IMAGE_PIXELS Pillow warns, above twice that it raises DecompressionBombError; the
# explicit size check below refuses everything above MAX_PIXELS before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A truncated file is an error, never an image with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# JPEG covers MPO (multi-picture JPEGs from some cameras): Pillow opens them through the JPEG plugin.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

# The resize filter of upstream's preprocessing (torchvision Resize's default, bilinear with antialiasing).
# Changing it changes every model input: bicubic moves a detailed picture by up to ~30 8-bit levels.
RESAMPLE = Image.Resampling.BILINEAR


def _source_path(source: Any, field: str) -> Path | None:
    """The file behind a path or a Gradio file payload; None for in-memory images."""
    if isinstance(source, dict):
        source = source.get("path")
        if not isinstance(source, str) or not source:
            raise InputError(f"{field}: the uploaded file payload has no path; upload the file again")
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    return None


def _check_size(width: int, height: int, field: str) -> None:
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputError(
            f"{field}: {width}x{height} pixels is too large; each side must be from 1 to {MAX_SIDE} pixels "
            f"and the total at most {MAX_PIXELS // 1_000_000} megapixels"
        )


def _open_file(path: Path, field: str) -> Image.Image:
    if not path.is_file():
        raise InputError(f"{field}: file not found; upload the image again")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{field}: the file is {size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; the size check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(
            f"{field}: the image has more than {MAX_PIXELS // 1_000_000} megapixels (a decompression bomb?)"
        ) from None
    except Exception:
        # UnidentifiedImageError for most non-images; other plugins raise OSError, SyntaxError or ValueError
        # on malformed headers. Whatever it is, the file cannot be read as an image.
        raise InputError(
            f"{field}: not an image file that can be read; use PNG, JPEG, GIF, WebP, BMP or TIFF"
        ) from None
    with img:  # animations keep the file open until closed
        _check_size(img.width, img.height, field)
        try:
            img.seek(0)  # animations: the first frame
            img.load()
        except Exception:
            # Truncated data, a corrupt stream, a decoder limit: Pillow raises OSError, SyntaxError, ValueError,
            # EOFError or its own errors depending on the format. None of them leaves a usable image.
            raise InputError(f"{field}: the image file is truncated or damaged") from None
        # Orientation is read while the file is open (TIFF keeps it in tags a copy would lose); the result is
        # a detached copy either way.
        return _oriented(img)


def _oriented(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored (the pixels are still fine)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()


def _from_array(arr: np.ndarray, field: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"{field}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], field)
    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.uint16:
        data = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{field}: the array contains NaN or infinite values")
        # Float images come as 0..1 (most libraries) or 0..255 (Gradio's numpy type); tell them apart by range.
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        data = (arr.astype(np.float64) * scale).clip(0, 255).round().astype(np.uint8)
    elif arr.dtype == np.bool_:
        data = arr.astype(np.uint8) * 255
    else:
        raise InputError(f"{field}: expected an array of uint8, uint16, float or bool values, got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(data))


def open_image(source: Any, field: str = "image") -> Image.Image:
    """A checked, fully decoded and upright PIL image from any accepted source (not yet converted to RGB)."""
    if source is None or (isinstance(source, str) and not source):
        raise InputError(f"{field}: no image was given")
    path = _source_path(source, field)
    if path is not None:
        return _open_file(path, field)
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, field)
        return _oriented(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, field)
    raise InputError(f"{field}: expected an image file, got a {type(source).__name__}")


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale -> 8-bit L, scaled rather than clipped.

    Pillow's own conversion of I;16 to L clips at 255, which turns most 16-bit images white.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "I":
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # F
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    return Image.fromarray(np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, field: str = "image") -> Image.Image:
    """Convert any supported mode to RGB (transparency laid over white)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _wide_to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError):
        raise InputError(f"{field}: colour mode {img.mode} is not supported; save the image as RGB") from None


def cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers height x width, keep the centre (upstream: resize short side, centre crop).

    Upstream's torchvision transform (Resize(min(height, width)), bilinear with antialiasing, then CenterCrop)
    gives the same picture, within one 8-bit level, wherever the two geometries agree: landscape images whose
    resized size is whole (900x400 at 320x512). Two differences are on purpose:

    * portrait and square images on a landscape model: upstream scales the image's width to the frame's
      height and pads both sides with black bars; scaling to cover fills the frame instead (upstream's own
      steps with the short side scaled to the frame's width);
    * a resized size that is not whole (1000x600 at 320x512: 533.3x320): torchvision truncates it to 533 and
      rounds the crop offset, which shifts and stretches the picture by up to a pixel; here both axes share
      one scale and the crop is the exact centre (the box may be fractional).

    The crop box is taken in the source image, so a 1x4000 strip never becomes a huge intermediate image.
    tests/test_image_resize.py checks all of this against upstream's transform and a plain float64 resample.
    """
    w, h = img.size
    scale = max(width / w, height / h)
    # On the side that decides the scale, width / scale is w in exact arithmetic but can round a hair above
    # it (2000x1000 -> 576x1024: 1000.0000000000001), which made the box's edge negative and Pillow raise.
    # The crop can never be larger than the image, so clamp it there.
    crop_w, crop_h = min(width / scale, float(w)), min(height / scale, float(h))
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return img.resize((width, height), RESAMPLE, box=(left, top, left + crop_w, top + crop_h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def prepare_image(source: Any, height: int, width: int, field: str = "image") -> torch.Tensor:
    """Any accepted image source -> (3, height, width) float32 in [-1, 1], ready for the pipeline."""
    return to_tensor(cover_crop(to_rgb(open_image(source, field), field), height, width))
