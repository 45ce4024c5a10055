"""Image-to-video synthesis: encode the image and prompt, sample latents, decode the video.

`image_guided_synthesis` (stock sampler) and `image_guided_synthesis_fixed` keep upstream's name and
signature; `run_synthesis` is the same pipeline returning what the app needs to report (NaN step, the
timesteps actually run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .loading.spec import spec_if_any
from .sampling import SAMPLER_NAMES, make_sampler

SAMPLERS = SAMPLER_NAMES  # the name other modules import; the registry in dc_app.sampling is the source


@dataclass
class SynthesisResult:
    videos: torch.Tensor                 # (b, n_samples, 3, t, H, W), unclamped; NaN where the sampler broke
    nonfinite: dict | None = None        # first non-finite value: {"step", "index", "timestep", "stage"}
    ddim_timesteps: list[int] = field(default_factory=list)  # the timesteps the sampler actually ran
    notices: list[str] = field(default_factory=list)         # the sampler's remarks on the settings (ignored eta)


def default_fs(model) -> int:
    """fs when a caller gives none: the model spec's default (5 for 512_interp, whose UNet's own default_fs is
    24), or the UNet's default_fs for a bare upstream config."""
    spec = spec_if_any(model.config)
    return int(spec.defaults.fs) if spec is not None else int(model.model.diffusion_model.default_fs)


def image_conditioning(model, videos: torch.Tensor, loop: bool, interp: bool,
                       posterior_noise: torch.Tensor | None, generator) -> tuple[torch.Tensor, list | None]:
    """(`c_concat`, references): latents of the conditioning frame(s) laid over the model's T frames
    (b, 4, T, h, w), and for a temporal decoder (ToonCrafter) the keyframes' reference features, else None.

    i2v: frame 0's latent repeated over T. interp/loop: first and last frame latents at both ends,
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
    return z[:, :, :1].expand(-1, -1, T, -1, -1).contiguous(), references  # b 4 T h w


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
) -> SynthesisResult:
    """Upstream's `image_guided_synthesis` with the sampler chosen by name (dc_app.sampling.SAMPLER_NAMES).

    `videos` (b, 3, t, H, W) in [-1, 1]: frame 0 is the image (interp/loop: the last frame too).
    RNG order without injection matches upstream: posterior noise, then per sample x_T and one draw per step.
    `cfg_img` is accepted for upstream compatibility and unused, as in upstream without multiple_cond_cfg.
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
    fs_value = default_fs(model) if fs is None else int(fs)
    fs_tensor = torch.full((batch_size,), fs_value, dtype=torch.long, device=device)

    image = videos[:, :, 0]  # b 3 H W
    c_concat, references = image_conditioning(model, videos, loop, interp, posterior_noise, generator)
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

    ddim = make_sampler(sampler, model)
    variants, nonfinite, timesteps, notices = [], None, [], []
    for _ in range(n_samples):
        samples, inter = ddim.sample(
            S=ddim_steps,
            batch_size=batch_size,
            shape=tuple(noise_shape[1:]),
            conditioning=cond,
            eta=ddim_eta,
            x_T=x_T,
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
    return SynthesisResult(videos=videos_out, nonfinite=nonfinite, ddim_timesteps=timesteps, notices=notices)


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
