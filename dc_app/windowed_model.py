"""A model wrapper that lets any sampler denoise more frames than the UNet was trained on.

`WindowedModel(model, frames)` looks like `model` to a sampler (every attribute is the wrapped model's), but
its `apply_model` takes a latent of N frames: it runs the real UNet on the overlapping windows of T frames
laid out by `dc_app.windows.WindowLayout`, `window_batch` windows per UNet call, and fuses the outputs with
the layout's weights (a weighted mean per frame). The UNet never sees more than `window_batch` windows, so
its peak memory does not depend on N; only the N-frame latent and output buffers do.

What each window is given, i.e. "the full conditioning a T-frame clip gets":
* the noisy latent and the concat latent (`c_concat`) of its own T frames;
* the same timestep and fs as the whole video;
* the same cross-attention context as a T-frame clip: 77 text tokens, then 16 image tokens per frame
  position. DynamiCrafter's Resampler learns one set of 16 queries per position 0..T-1 (all reading the same
  image), and the UNet hands frame j of its input the tokens 16j..16j+15 (`UNetModel._frame_context`). So
  local frame j of every window reads the tokens of position j, exactly as frame j of a T-frame clip does:
  the (b, 77 + 16T, d) context passes to every window unchanged.

With one window (N = T) `apply_model` is a straight call to the wrapped model: no slicing, no fusion, the
same result bit for bit. A batch above 1 (several samples, or the sampler's cond + uncond batch for
classifier-free guidance) is kept together: the windows of one call are stacked window-major along the
batch, and every per-sample argument is repeated to match.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .windows import WindowLayout

# Conditioning entries laid out per frame (b, c, N, h, w): each window gets its own frames. Every other
# entry (the cross-attention context) is per sample and is repeated for each window of a call.
FRAME_CONDITIONING = ("c_concat",)


class WindowedModel:
    """`model` with an `apply_model` over N frames (see the module docstring); everything else delegates."""

    def __init__(self, model, frames: int, stride: int | None = None, window_batch: int = 1,
                 on_unet_call: Callable[[int], None] | None = None):
        if int(window_batch) < 1:
            raise ValueError(f"window_batch={window_batch}: expected at least 1 window per UNet call")
        self.base_model = model
        self.layout = WindowLayout.for_model(frames, int(model.temporal_length), stride)
        self.window_batch = int(window_batch)
        self.on_unet_call = on_unet_call
        self.unet_calls = 0

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this wrapper does not define: the sampler's view of the real model.
        if name == "base_model":
            raise AttributeError(name)  # during unpickling/copy, before __init__ ran
        return getattr(self.base_model, name)

    @property
    def calls_per_evaluation(self) -> int:
        """UNet calls of one apply_model: the windows, `window_batch` at a time."""
        return math.ceil(self.layout.count / self.window_batch)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        """(b, c, N, h, w) -> the fused model output (b, c_out, N, h, w), float32."""
        layout = self.layout
        if x.ndim != 5 or x.shape[2] != layout.frames:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (b, c, {layout.frames}, h, w)")
        if layout.count == 1:
            return self._unet(x, t, cond, **kwargs)
        batch, window = x.shape[0], layout.window
        weights = layout.weights.to(device=x.device, dtype=torch.float32)
        fused = None
        for first in range(0, layout.count, self.window_batch):
            group = list(range(first, min(first + self.window_batch, layout.count)))
            spans = [slice(layout.starts[k], layout.starts[k] + window) for k in group]
            out = self._unet(
                torch.cat([x[:, :, span] for span in spans]),
                _repeat(t, len(group), batch),
                _window_conditioning(cond, spans, batch),
                **{name: _repeat(value, len(group), batch) for name, value in kwargs.items()},
            )
            if fused is None:
                fused = out.new_zeros(batch, out.shape[1], layout.frames, *out.shape[3:])
            for k, span, part in zip(group, spans, out.split(batch)):
                fused[:, :, span] += part * weights[k].view(1, 1, window, 1, 1)
        return fused

    def _unet(self, x, t, cond, **kwargs) -> torch.Tensor:
        out = self.base_model.apply_model(x, t, cond, **kwargs)
        self.unet_calls += 1
        if self.on_unet_call is not None:
            self.on_unet_call(self.unet_calls)  # may raise (cancel): the sampler stops there
        return out


def _repeat(value: Any, windows: int, batch: int) -> Any:
    """A per-sample tensor (batch, ...) repeated for `windows` stacked windows; anything else unchanged."""
    if windows == 1 or not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
        return value
    return value.repeat(windows, *([1] * (value.ndim - 1)))


def _window_conditioning(cond: dict, spans: list[slice], batch: int) -> dict:
    """The conditioning of stacked windows: per-frame entries sliced, per-sample entries repeated."""
    windowed = {}
    for key, values in cond.items():
        if key in FRAME_CONDITIONING:
            windowed[key] = [torch.cat([c[:, :, span] for span in spans]) for c in values]
        else:
            windowed[key] = [_repeat(c, len(spans), batch) for c in values]
    return windowed
