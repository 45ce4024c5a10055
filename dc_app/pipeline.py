"""Image-to-video synthesis: encode the image and prompt, sample latents, decode the video.

`image_guided_synthesis` (stock sampler) and `image_guided_synthesis_fixed` keep upstream's name and
signature; `run_synthesis` is the same pipeline returning what the app needs to report (NaN step, the
timesteps actually run). With more frames than the model's trained length T, `run_synthesis` denoises
overlapping windows of T frames (docs/long-videos.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .loading.spec import spec_if_any
from .noise_rescheduling import initial_noise
from .sampling import make_sampler
from .windowed_model import WindowedModel
from .windows import MAX_LENGTH_FACTOR


@dataclass
class SynthesisResult:
    videos: torch.Tensor                 # (b, n_samples, 3, t, H, W), unclamped; NaN where the sampler broke
    nonfinite: dict | None = None        # first non-finite value: {"step", "index", "timestep", "stage"}
    ddim_timesteps: list[int] = field(default_factory=list)  # the timesteps the sampler actually ran
    notices: list[str] = field(default_factory=list)         # the sampler's remarks on the settings (ignored eta)
    # frames, window, stride, windows, window_batch, reschedule_noise, unet_calls: what the sidecar records
    long_video: dict = field(default_factory=dict)


def image_video(image: torch.Tensor, frames: int) -> torch.Tensor:
    """The image-to-video input: an image (3, H, W) repeated over `frames` -> (1, 3, frames, H, W), as upstream's
    loader lays it out (the pipeline conditions on frame 0)."""
    return image.unsqueeze(1).repeat(1, frames, 1, 1).unsqueeze(0)


def keyframe_video(first: torch.Tensor, last: torch.Tensor, frames: int) -> torch.Tensor:
    """The interpolation input: `first` over the first half of `frames`, `last` over the rest -> (1, 3, frames,
    H, W). The model reads only the first and the last frame; a loop passes the same image twice."""
    half = (frames + 1) // 2
    return torch.stack([first] * half + [last] * (frames - half), dim=1).unsqueeze(0)


def default_fs(model) -> int:
    """fs when a caller gives none: the model spec's default (5 for 512_interp, whose UNet's own default_fs is
    24), or the UNet's default_fs for a bare upstream config."""
    spec = spec_if_any(model.config)
    return int(spec.defaults.fs) if spec is not None else int(model.model.diffusion_model.default_fs)


def image_conditioning(model, videos: torch.Tensor, loop: bool, interp: bool,
                       posterior_noise: torch.Tensor | None, generator,
                       frames: int | None = None) -> tuple[torch.Tensor, list | None]:
    """(`c_concat`, references): latents of the conditioning frame(s) laid over the video's frames
    (b, 4, N, h, w), and for a temporal decoder (ToonCrafter) the keyframes' reference features, else None.

    N = `frames`, default the model's T. i2v: frame 0's latent repeated over N (each window then gets the
    same T-frame conditioning as a plain clip). interp/loop: first and last frame latents at both ends,
    zeros between. Only those frames are encoded; upstream encodes every frame and keeps these, which
    draws more posterior noise but gives the same values when the noise is injected (the encoder works
    frame by frame, so the first and last frames' features do not depend on the frames between).
    `posterior_noise`: ((b t), 4, h, w) draws in upstream's order (one per input frame).
    """
    b, _, t, _, _ = videos.shape
    temporal = getattr(model, "temporal_decoder", False)
    # ToonCrafter's decoder always takes the first and last frame's features, whatever the mode.
    frame_ids = [0, t - 1] if (loop or interp or temporal) else [0]
    noise = None
    if posterior_noise is not None:
        per_video = posterior_noise.reshape(b, t, *posterior_noise.shape[1:])  # b t 4 h w
        noise = per_video[:, frame_ids].reshape(b * len(frame_ids), *posterior_noise.shape[1:])
    references = None
    if temporal:
        z, references = model.encode_keyframes(videos[:, :, frame_ids], noise=noise, generator=generator)
    else:
        z = model.encode_first_stage(videos[:, :, frame_ids], noise=noise, generator=generator)  # b 4 f h w
    T = model.temporal_length
    if loop or interp:
        cond = torch.zeros(b, z.shape[1], T, *z.shape[3:], dtype=z.dtype, device=z.device)
        cond[:, :, 0], cond[:, :, -1] = z[:, :, 0], z[:, :, -1]
        return cond, references
    n = T if frames is None else int(frames)
    return z[:, :, :1].expand(-1, -1, n, -1, -1).contiguous(), references  # b 4 N h w


def decode_with_references(model, samples: torch.Tensor, references: list) -> torch.Tensor:
    """ToonCrafter's decode of sampled latents (b, 4, T, h, w) -> (b, 3, T, H, W), upstream's statements
    (scripts/evaluation/inference.py:262-270) including their middle-frame fix-up.

    All T frames are decoded with the references; then the latents without frames 1 and T-2 are decoded again
    (T-2 frames, so every chunk position shifts), and output frames T/2-1 and T/2 are taken from that second
    decode (its frames T/2-2 and T/2-1, i.e. latent frames T/2-1 and T/2 again, in the shorter context).
    Upstream gives no reason; it changes those two frames only. At T = 4 it is degenerate: output frames 1, 2
    become the decodes of latent frames 0 and 3. Below 4 frames upstream crashes or mis-assigns, so the
    fix-up is skipped there (dc_app models have 4 or 16 frames).
    """
    video = model.decode_first_stage(samples, references=references)
    t = samples.shape[2]
    if t < 4:
        return video
    kept = [i for i in range(t) if i not in (1, t - 2)]
    middle = model.decode_first_stage(samples[:, :, kept], references=references)
    video[:, :, t // 2 - 1 : t // 2 + 1] = middle[:, :, t // 2 - 2 : t // 2]
    return video


def check_frames(model, frames: int, interp: bool = False) -> None:
    """ValueError unless `frames` is a length the model can make: T..8T for image-to-video, T for interp."""
    T = int(model.temporal_length)
    if interp and frames != T:
        raise ValueError(f"frames={frames}: an interpolation model makes exactly its trained {T} frames")
    if not T <= frames <= MAX_LENGTH_FACTOR * T:
        raise ValueError(f"frames={frames}: expected {T} to {MAX_LENGTH_FACTOR * T} ({MAX_LENGTH_FACTOR}x the "
                         f"model's trained {T} frames)")


def planned_unet_calls(sampler, ddim_steps: int, timestep_spacing: str, ddim_eta: float,
                       calls_per_evaluation: int, two_call_cfg: bool, n_samples: int) -> int | None:
    """UNet calls of a run, for progress; None when the sampler cannot tell its step count in advance."""
    make_schedule = getattr(sampler, "make_schedule", None)
    if make_schedule is None:
        return None
    # Positional: the DDIM samplers and the multistep ones name these arguments differently.
    make_schedule(ddim_steps, timestep_spacing, ddim_eta, verbose=False)
    steps = len(sampler.ddim_timesteps)
    return n_samples * steps * calls_per_evaluation * (2 if two_call_cfg else 1)


@torch.no_grad()
def run_synthesis(
    model,
    sampler: str,
    prompts: Sequence[str],
    videos: torch.Tensor,
    noise_shape: Sequence[int],
    n_samples: int = 1,
    ddim_steps: int = 50,
    ddim_eta: float = 1.0,
    unconditional_guidance_scale: float = 1.0,
    cfg_img: float | None = None,
    fs: int | None = None,
    text_input: bool = True,
    loop: bool = False,
    interp: bool = False,
    timestep_spacing: str = "uniform",
    guidance_rescale: float = 0.0,
    *,
    x_T: torch.Tensor | None = None,
    variance_noise=None,
    posterior_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    batched_cfg: bool = True,
    decode_chunk_size: int | None = None,
    frames: int | None = None,
    window_stride: int | None = None,
    window_batch: int = 1,
    reschedule_noise: bool = True,
    on_unet_call: Callable[[int, int | None], None] | None = None,
) -> SynthesisResult:
    """Upstream's `image_guided_synthesis` with the sampler chosen by name (dc_app.sampling.SAMPLER_NAMES).

    `videos` (b, 3, t, H, W) in [-1, 1]: frame 0 is the image (interp/loop: the last frame too).
    RNG order without injection matches upstream: posterior noise, then per sample x_T and one draw per step.
    `cfg_img` is accepted for upstream compatibility and unused, as in upstream without multiple_cond_cfg.

    Long videos: `frames` N (default `noise_shape[2]`; both given must agree) from T to 8T. The sampler
    sees a `WindowedModel`: windows of T frames every `window_stride` frames (default T/4), `window_batch`
    windows per UNet call (one window, N = T, is a straight call to the model). Above T, x_T is
    FreeNoise-rescheduled unless `reschedule_noise` is False (an injected `x_T` is used as given) and the
    VAE decodes at most T frames at a time unless `decode_chunk_size` says otherwise. N = T runs exactly the
    plain path; `long_video` in the result records the window settings either way.
    `on_unet_call(done, total)` runs after every UNet call (total: the planned number, or None when the
    sampler cannot tell); what it raises stops the run, like `callback`.
    """
    if (x_T is not None or variance_noise is not None) and n_samples != 1:
        raise ValueError(f"injected x_T/variance_noise need n_samples=1, got n_samples={n_samples}")
    device = model.device
    videos = videos.to(device=device, dtype=torch.float32)
    batch_size = int(noise_shape[0])
    if videos.shape[0] != batch_size:
        raise ValueError(f"videos batch {videos.shape[0]} != noise_shape[0] {batch_size}")
    if not text_input:
        prompts = [""] * batch_size
    if len(prompts) != batch_size:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}")
    frames = int(noise_shape[2]) if frames is None else int(frames)
    if frames != int(noise_shape[2]):
        raise ValueError(f"frames={frames} but noise_shape[2]={noise_shape[2]}: give one length")
    check_frames(model, frames, interp=interp or loop)
    noise_shape = (*noise_shape[:2], frames, *noise_shape[3:])
    window = int(model.temporal_length)
    if x_T is not None and tuple(x_T.shape) != tuple(int(d) for d in noise_shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(noise_shape)}")
    if frames > window and decode_chunk_size is None:
        decode_chunk_size = 1 if model.perframe_ae else window  # the VAE never decodes more than T frames at once
    fs_value = default_fs(model) if fs is None else int(fs)
    fs_tensor = torch.full((batch_size,), fs_value, dtype=torch.long, device=device)

    image = videos[:, :, 0]  # b 3 H W
    c_concat, references = image_conditioning(model, videos, loop, interp, posterior_noise, generator, frames)
    cond = {
        "c_crossattn": [torch.cat([model.get_learned_conditioning(list(prompts)), model.encode_image_tokens(image)], 1)],
        "c_concat": [c_concat],
    }
    uncond = None
    if unconditional_guidance_scale != 1.0:
        # Unconditional branch: empty prompt and an all-zero image, same concat latents (upstream "empty_seq").
        uc_text = model.get_learned_conditioning([""] * batch_size)
        if model.uncond_type == "zero_embed":
            uc_text = torch.zeros_like(uc_text)
        uc_image = model.encode_image_tokens(torch.zeros_like(image))
        uncond = {"c_crossattn": [torch.cat([uc_text, uc_image], 1)], "c_concat": [c_concat]}

    # The sampler always sees the windowed model: with one window (N = T) it calls the model straight
    # through, so the plain path is unchanged, and UNet calls are counted either way.
    windowed = WindowedModel(model, frames, window_stride, window_batch)
    ddim = make_sampler(sampler, windowed)
    if on_unet_call is not None:
        total = planned_unet_calls(ddim, ddim_steps, timestep_spacing, ddim_eta, windowed.calls_per_evaluation,
                                   uncond is not None and not batched_cfg, n_samples)
        windowed.on_unet_call = lambda done: on_unet_call(done, total)
    variants, nonfinite, timesteps, notices = [], None, [], []
    for _ in range(n_samples):
        start_noise = x_T
        if start_noise is None and frames > window:
            start_noise = initial_noise(noise_shape, window, windowed.layout.stride, reschedule_noise,
                                        device=device, generator=generator)
        samples, inter = ddim.sample(
            S=ddim_steps,
            batch_size=batch_size,
            shape=tuple(noise_shape[1:]),
            conditioning=cond,
            eta=ddim_eta,
            x_T=start_noise,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=uncond,
            fs=fs_tensor,
            timestep_spacing=timestep_spacing,
            guidance_rescale=guidance_rescale,
            callback=callback,
            verbose=False,
            variance_noise=variance_noise,
            generator=generator,
            batched_cfg=batched_cfg,
        )
        nonfinite = nonfinite or inter.get("nonfinite")
        timesteps = [int(t) for t in ddim.ddim_timesteps]
        notices = list(ddim.notices)
        if references is not None:
            # A temporal decoder's chunk is fixed by the model: decode_chunk_size does not apply.
            variants.append(decode_with_references(model, samples, references))
        else:
            variants.append(model.decode_first_stage(samples, chunk_size=decode_chunk_size))
    videos_out = torch.stack(variants, dim=1)  # b n 3 t H W
    layout = windowed.layout
    long_video = {"frames": frames, "window": layout.window, "stride": layout.stride, "windows": layout.count,
                  "window_batch": windowed.window_batch, "reschedule_noise": bool(reschedule_noise),
                  "unet_calls": windowed.unet_calls}
    return SynthesisResult(videos=videos_out, nonfinite=nonfinite, ddim_timesteps=timesteps, notices=notices,
                           long_video=long_video)


def image_guided_synthesis(model, prompts, videos, noise_shape, n_samples=1, ddim_steps=50, ddim_eta=1.0,
                           unconditional_guidance_scale=1.0, cfg_img=None, fs=None, text_input=True, loop=False,
                           interp=False, timestep_spacing="uniform", guidance_rescale=0.0, *, x_T=None,
                           variance_noise=None, posterior_noise=None, generator=None, callback=None):
    """Upstream's pipeline with upstream's (stock) DDIM sampler -> (b, n_samples, 3, t, H, W)."""
    return run_synthesis(sampler="stock", **locals()).videos


def image_guided_synthesis_fixed(model, prompts, videos, noise_shape, n_samples=1, ddim_steps=50, ddim_eta=1.0,
                                 unconditional_guidance_scale=1.0, cfg_img=None, fs=None, text_input=True,
                                 loop=False, interp=False, timestep_spacing="uniform", guidance_rescale=0.0, *,
                                 x_T=None, variance_noise=None, posterior_noise=None, generator=None, callback=None):
    """The same pipeline with the fixed DDIM sampler: finite for every setting."""
    return run_synthesis(sampler="fixed", **locals()).videos
