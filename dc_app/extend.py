"""Extend: continue a finished video from its last frame with the image-to-video model, and join the two.

The continuation is an ordinary image-to-video run (T to 8T frames) whose image is the video's last frame.
Its first frame re-creates that image, so the join drops it: t + N - 1 frames.

Known drift: the model sees one frame, not the motion before it, so the motion may change direction or
speed at the join; and each continuation starts from a decoded, re-encoded frame, so colours and fine detail
drift a little more with every extension (extending an extension compounds it).

`last_frame` reads only the last frame of an uploaded video, after checking its size and duration.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import MAX_FILE_BYTES, MAX_PIXELS, MAX_SIDE
from .loading.spec import model_interpolates
from .pipeline import SynthesisResult, image_video, run_synthesis
from .validation import InputError

MAX_VIDEO_BYTES = MAX_FILE_BYTES   # the app's upload limit
MAX_VIDEO_SECONDS = 120.0          # far longer than any video dc_app makes (8T frames at the model's fps)
# How far before the end ffmpeg starts decoding: enough to reach a keyframe-independent last frame, short
# enough that a long upload is never decoded in full.
SEEK_BACK_SECONDS = 2.0


def last_frame(path: str | os.PathLike, max_bytes: int = MAX_VIDEO_BYTES,
               max_seconds: float = MAX_VIDEO_SECONDS, field: str = "video") -> np.ndarray:
    """The last frame of the video file at `path` as (H, W, 3) uint8 RGB.

    Refused with an InputError naming `field`: a missing file, a file over `max_bytes`, a video whose
    duration is unknown or over `max_seconds`, frames over the image limits, a file ffmpeg cannot decode.
    Only the last `SEEK_BACK_SECONDS` of the video are decoded.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field}: no such file; upload the video again")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{field}: the file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    try:
        meta = _read_meta(imageio_ffmpeg, path)
    except (OSError, RuntimeError, StopIteration):
        raise InputError(f"{field}: not a video file ffmpeg can read") from None
    duration = float(meta.get("duration") or 0.0)
    if duration <= 0.0:
        raise InputError(f"{field}: the video does not say how long it is; re-encode it as an mp4")
    if duration > max_seconds:
        raise InputError(f"{field}: the video lasts {duration:.1f} s; the limit is {max_seconds:.0f} s")
    width, height = (int(v) for v in meta["size"])
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise InputError(f"{field}: {width}x{height} frames are too large (at most {MAX_SIDE} pixels a side "
                         f"and {MAX_PIXELS // 1_000_000} megapixels)")

    frames = imageio_ffmpeg.read_frames(str(path), input_params=["-sseof", f"-{SEEK_BACK_SECONDS:g}"])
    last = None
    try:
        next(frames)  # the metadata again
        for last in frames:
            pass
    except (OSError, RuntimeError, StopIteration):
        raise InputError(f"{field}: the video could not be decoded") from None
    finally:
        frames.close()
    if last is None or len(last) != width * height * 3:
        raise InputError(f"{field}: the video has no frame that could be decoded")
    return np.frombuffer(last, dtype=np.uint8).reshape(height, width, 3).copy()


def _read_meta(imageio_ffmpeg, path: Path) -> dict:
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(reader)
    finally:
        reader.close()


@dataclass
class ExtendResult:
    video: torch.Tensor            # (3, t + N - 1, H, W): the given frames, then the continuation
    continuation: SynthesisResult  # the image-to-video run (its video includes the re-created first frame)


def extend_video(model, sampler: str, video: torch.Tensor, prompt: str = "", frames: int | None = None,
                 **settings) -> ExtendResult:
    """Continue `video` (3, t, H, W) in [-1, 1] at the model's size for `frames` N (default T) more frames.

    `settings` go to `run_synthesis` (ddim_steps, generator, window options, callback, ...).
    """
    if model_interpolates(model):
        raise ValueError("extend: an interpolation model cannot continue a video; use an image-to-video model")
    h, w = model.image_size
    if video.ndim != 4 or video.shape[0] != 3 or tuple(video.shape[2:]) != (8 * h, 8 * w):
        raise ValueError(f"extend: video has shape {tuple(video.shape)}, expected (3, t, {8 * h}, {8 * w})")
    window = int(model.temporal_length)
    frames = window if frames is None else int(frames)
    i2v_input = image_video(video[:, -1], window)  # 1 3 T H W, as the app's image-to-video input
    result = run_synthesis(model, sampler, [prompt], i2v_input, [1, model.channels, frames, h, w], **settings)
    continuation = result.videos[0, 0].to(video.device)  # 3 N H W
    return ExtendResult(video=torch.cat([video, continuation[:, 1:]], dim=1), continuation=result)


def join_with_upload(upload: str | os.PathLike, continuation: str | os.PathLike, out: str | os.PathLike,
                     size: tuple[int, int], fps: int) -> int:
    """Write `out`: the uploaded video, cropped to `size` (H, W) like an input image (scaled to cover, centre
    kept) at `fps`, then the continuation without its first frame (it re-creates the upload's last frame).

    ffmpeg streams the upload from disk to disk: the app itself decodes only the upload's last frame
    (`last_frame`). Returns the joined video's frame count. Raises OSError when ffmpeg fails.
    """
    import subprocess

    import imageio_ffmpeg

    h, w = size
    graph = (f"[0:v]fps={fps},scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h},setsar=1,"
             f"format=yuv420p[a];[1:v]trim=start_frame=1,setpts=PTS-STARTPTS,setsar=1,format=yuv420p[b];"
             f"[a][b]concat=n=2:v=1:a=0[out]")
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(upload), "-i", str(continuation),
               "-filter_complex", graph, "-map", "[out]", "-an", "-c:v", "libx264", "-crf", "18",
               "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise OSError(f"ffmpeg could not join the videos: {done.stderr.strip()[-300:]}")
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    return int(frames)
