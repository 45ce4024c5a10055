"""Overlapping windows over a long latent video, and the weights that fuse their outputs (FreeNoise-style).

A video of N frames is covered by windows of the model's trained length T that start every `stride` frames;
the last window is moved back so that it ends flush with frame N - 1. With the default stride T/4 and N a
multiple of it, that is 4N/T - 3 windows (N = T: one window).

Fusion weighting: inside a window, local frame j (0-based) gets the triangular taper min(j + 1, T - j), so a
window's edge frames count 1 and its middle frames count about T/2. A frame's output is the weighted mean of
the outputs of the windows that cover it: each taper value divided by the sum of the taper values that frame
gets from all its windows, so a frame's weights sum to 1. Edge frames weigh less because a window edge is
where the UNet's temporal attention sees the least context (FreeNoise weights frames by their distance to
the window centre for the same reason). Every taper value is positive, so a frame covered by one window
(the first and last frames) gets exactly that window's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# The longest video a model makes, in multiples of its trained length (the limit; UI and API share it).
MAX_LENGTH_FACTOR = 8


def default_stride(window: int) -> int:
    """T/4 (at least 1 frame): the stride of FreeNoise's default setting."""
    return max(1, window // 4)


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window: 0, stride, 2 stride, ..., and a last window ending flush with the video."""
    if window < 1:
        raise ValueError(f"window={window}: expected at least 1 frame")
    if frames < window:
        raise ValueError(f"frames={frames}: expected at least the window length {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride}: expected 1 to the window length {window}")
    last = frames - window
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)  # N - T is not a multiple of the stride: the last window overlaps more
    return starts


def window_taper(window: int) -> torch.Tensor:
    """The float64 weight of each local frame: min(j + 1, T - j) (edges 1, middle about T/2)."""
    j = torch.arange(window, dtype=torch.float64)
    return torch.minimum(j + 1, window - j)


@dataclass(frozen=True)
class WindowLayout:
    """The windows that cover `frames` frames, and each window's fusion weights."""

    frames: int
    window: int
    stride: int

    @classmethod
    def for_model(cls, frames: int, window: int, stride: int | None = None) -> "WindowLayout":
        return cls(int(frames), int(window), default_stride(window) if stride is None else int(stride))

    @cached_property
    def starts(self) -> list[int]:
        return window_starts(self.frames, self.window, self.stride)

    @property
    def count(self) -> int:
        return len(self.starts)

    @cached_property
    def weights(self) -> torch.Tensor:
        """(windows, T) float64: window k's weight for each of its frames; per video frame they sum to 1."""
        taper = window_taper(self.window)
        total = torch.zeros(self.frames, dtype=torch.float64)
        for s in self.starts:
            total[s : s + self.window] += taper
        return torch.stack([taper / total[s : s + self.window] for s in self.starts])

    def frame_weight_sums(self) -> torch.Tensor:
        """(frames,) float64: the sum of the weights each video frame gets (1 up to rounding)."""
        sums = torch.zeros(self.frames, dtype=torch.float64)
        for s, w in zip(self.starts, self.weights):
            sums[s : s + self.window] += w
        return sums


def window_count(frames: int, window: int, stride: int | None = None) -> int:
    """How many windows (UNet calls per denoiser evaluation, one window per call) a video of `frames` needs."""
    return WindowLayout.for_model(frames, window, stride).count
