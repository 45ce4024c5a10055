"""FreeNoise's noise rescheduling: the initial noise of a long video, built from the first window's noise.

Independent noise per frame gives each window its own unrelated content, and their fusion blurs. FreeNoise
(Qiu et al., ICLR 2024) instead reuses the first window's T frame noises for the rest of the video: every
later block of `stride` frames takes the noises of the frames one window length earlier, in a shuffled
order. Every window then holds a permutation of (mostly) the same noises, so the windows agree on content,
and the shuffle keeps frames from repeating in a fixed cycle of period T.

Only x_T is rescheduled. The fresh noise DDIM adds at each step (eta > 0) stays independent per frame, as
in FreeNoise's own sampler; at eta = 0 the whole run is determined by x_T.
"""
from __future__ import annotations

import torch


def reschedule_noise(first_window: torch.Tensor, frames: int, stride: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(b, c, T, h, w) noise of the first window -> (b, c, frames, h, w) noise of the whole video.

    Frames [i, i + stride) for i = T, T + stride, ... get the noises of frames [i - T, i - T + stride) in an
    order drawn with `torch.randperm(stride, generator)` (one draw per block; a block cut short by the end
    of the video uses the first entries of its permutation). The first T frames are `first_window` itself,
    so frames = T returns it unchanged. The same generator state gives the same noise.
    """
    if first_window.ndim != 5:
        raise ValueError(f"first_window: expected (b, c, T, h, w), got {tuple(first_window.shape)}")
    window = first_window.shape[2]
    if frames < window:
        raise ValueError(f"frames={frames}: expected at least the window length {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride}: expected 1 to the window length {window}")
    noise = first_window.new_empty(*first_window.shape[:2], frames, *first_window.shape[3:])
    noise[:, :, :window] = first_window
    device = generator.device if generator is not None else torch.device("cpu")
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        order = torch.randperm(stride, generator=generator, device=device)[:count].to(noise.device)
        # Sources lie one window earlier, so they are already filled (by the first window or a shuffle of it).
        noise[:, :, start : start + count] = noise[:, :, start - window + order]
    return noise


def initial_noise(shape, window: int, stride: int, reschedule: bool = True, device=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T of shape (b, c, N, h, w): rescheduled from T drawn frames, or N independently drawn frames.

    With N = T both draw exactly what the sampler would draw for x_T (`torch.randn(shape, generator)`).
    """
    b, c, frames, h, w = (int(d) for d in shape)
    if not reschedule or frames == window:
        return torch.randn((b, c, frames, h, w), device=device, generator=generator)
    first = torch.randn((b, c, window, h, w), device=device, generator=generator)
    return reschedule_noise(first, frames, stride, generator)
