"""Frames -> H.264 mp4 (yuv420p, plays in every browser) and a JSON sidecar of the settings that made it.

Both files are written under a temporary name and renamed into place, so a reader (the browser, a sweeper,
a user's download) sees a whole file or none, and a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

DEFAULT_FPS = 8          # upstream's demo writes 8 fps
CRF = 18                 # x264 constant quality: visually lossless for these short clips, small files


def partial_name(path: Path) -> Path:
    """The temporary name `path` is written under (hidden, same folder so the rename is atomic)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(3, t, H, W) in [-1, 1] -> (t, H, W, 3) uint8.

    Non-finite values are shown the way upstream's users see them: upstream clamps and casts to uint8, which
    turns NaN into 0 (black); +inf and -inf clamp to white and black.
    """
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames: expected (3, t, H, W), got {tuple(frames.shape)}")
    x = frames.detach().to("cpu", torch.float32)
    x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    tmp = partial_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_mp4(frames: torch.Tensor, path: Path, fps: int = DEFAULT_FPS,
              on_frame: Callable[[int], None] | None = None) -> Path:
    """Encode (3, t, H, W) frames in [-1, 1] to an H.264 yuv420p mp4 at `path`, atomically.

    `on_frame(i)` runs before frame i is sent (the service's fault injection uses it); whatever it raises
    aborts the file.
    """
    import imageio_ffmpeg

    pixels = frames_to_uint8(frames)
    t, h, w, _ = pixels.shape
    if h % 2 or w % 2:
        raise ValueError(f"frames: yuv420p needs even sizes, got {w}x{h}")

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            # faststart puts the index first, so the browser starts playing before the download ends.
            output_params=["-crf", str(CRF), "-movflags", "+faststart"],
        )
        writer.send(None)  # start ffmpeg
        try:
            for i in range(t):
                if on_frame is not None:
                    on_frame(i)
                writer.send(pixels[i].tobytes())
        finally:
            writer.close()

    return _atomic(path, write)


def versions() -> dict[str, str | None]:
    """Versions that decide a result's numbers, for the sidecar."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    from . import __version__

    return {"dc_app": __version__, "torch": torch.__version__, "gradio": version("gradio"),
            "python": platform.python_version()}


def write_sidecar(path: Path, settings: Mapping) -> Path:
    """Write `settings` plus the package versions as pretty JSON at `path`, atomically."""
    record = dict(settings)
    record["versions"] = versions()
    text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
