"""Storyboards: an interpolation model chained over K keyframes, the segments joined into one video.

Segment k runs the interpolation model from keyframe k to keyframe k + 1, so every segment has exactly the
T frames the model was trained on. Keyframe k + 1 ends segment k and starts segment k + 1; the join keeps
one copy of it by dropping each later segment's first frame: (K - 1)(T - 1) + 1 frames. With `loop`, a
closing segment runs from the last keyframe back to the first and drops its own final frame too (the
first frame of the video follows it when the video repeats): K (T - 1) frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .loading.spec import model_interpolates
from .pipeline import SynthesisResult, keyframe_video, run_synthesis
from .windows import MAX_LENGTH_FACTOR

# The most keyframes a storyboard takes: 8 segments of T - 1 new frames each, about the 8T frames a long
# image-to-video run is limited to (and 8 full model runs of time).
MAX_KEYFRAMES = MAX_LENGTH_FACTOR + 1


def storyboard_frame_count(keyframes: int, window: int, loop: bool = False) -> int:
    """Frames of the joined video: (K - 1)(T - 1) + 1, or K (T - 1) with `loop`."""
    return keyframes * (window - 1) if loop else (keyframes - 1) * (window - 1) + 1


def join_segments(segments: Sequence[torch.Tensor], closing: bool = False) -> torch.Tensor:
    """Segments (..., T, H, W) joined along the frame axis with one copy of each shared keyframe.

    Every segment after the first drops its first frame. `closing`: the last segment leads back to the
    first keyframe, so it also drops its final frame (a loop, not a repeated frame).
    """
    if not segments:
        raise ValueError("join_segments: no segments")
    parts = [segments[0]] + [s[..., 1:, :, :] for s in segments[1:]]
    if closing:
        if len(segments) < 2:
            raise ValueError("join_segments: a closing segment needs a segment before it")
        parts[-1] = parts[-1][..., :-1, :, :]
    return torch.cat(parts, dim=-3)


def segment_prompts(prompts: str | Sequence[str], segments: int) -> list[str]:
    """One prompt for every segment, or exactly one prompt per segment."""
    if isinstance(prompts, str):
        return [prompts] * segments
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * segments
    if len(prompts) != segments:
        raise ValueError(f"{len(prompts)} prompts for {segments} segments: give one prompt, or one per segment")
    return prompts


@dataclass
class StoryboardResult:
    video: torch.Tensor                   # (3, frames, H, W), unclamped: the joined segments
    segments: list[SynthesisResult]       # each segment's run, in order (the closing one last)
    keyframe_order: list[int]             # keyframe index at each segment's start, then the last one's end


def run_storyboard(
    model,
    sampler: str,
    keyframes: Sequence[torch.Tensor],
    prompts: str | Sequence[str] = "",
    loop: bool = False,
    *,
    generator: torch.Generator | None = None,
    on_segment: Callable[[int, int], None] | None = None,
    **settings,
) -> StoryboardResult:
    """Interpolate between consecutive keyframes (3, H, W) in [-1, 1] and join the segments.

    `prompts`: one for all segments or one per segment (K - 1, or K with `loop`). `settings` go to
    `run_synthesis` for every segment (ddim_steps, unconditional_guidance_scale, fs, callback, ...).
    Segments draw their noise from `generator` in order, so one seed reproduces the whole storyboard.
    `on_segment(k, count)` runs before segment k (what it raises stops the storyboard).
    """
    if not model_interpolates(model):
        raise ValueError("storyboard: this model cannot interpolate; use an interpolation model (512_interp)")
    count = len(keyframes)
    if not 2 <= count <= MAX_KEYFRAMES:
        raise ValueError(f"storyboard: {count} keyframes; expected 2 to {MAX_KEYFRAMES}")
    shape = tuple(keyframes[0].shape)
    for k, frame in enumerate(keyframes):
        if frame.ndim != 3 or tuple(frame.shape) != shape:
            raise ValueError(f"storyboard: keyframe {k} has shape {tuple(frame.shape)}, expected {shape} "
                             f"(crop every keyframe like the first)")
    order = list(range(count)) + ([0] if loop else [])
    pairs = list(zip(order[:-1], order[1:]))
    texts = segment_prompts(prompts, len(pairs))
    window = int(model.temporal_length)
    h, w = model.image_size

    results, videos = [], []
    for k, ((a, b), text) in enumerate(zip(pairs, texts)):
        if on_segment is not None:
            on_segment(k, len(pairs))
        segment_input = keyframe_video(keyframes[a], keyframes[b], window)  # 1 3 T H W, as the app lays it out
        result = run_synthesis(model, sampler, [text], segment_input, [1, model.channels, window, h, w],
                               interp=True, generator=generator, **settings)
        results.append(result)
        videos.append(result.videos[0, 0])  # 3 T H W
    return StoryboardResult(video=join_segments(videos, closing=loop), segments=results, keyframe_order=order)
