"""The DynamiCrafter latent video diffusion model: parts, DDPM schedule buffers and conditioning.

Module and buffer names follow upstream's `LatentVisualDiffusion`, so an official checkpoint's
state_dict loads strictly: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.*` (open_clip text), `embedder.*` (open_clip vision), `image_proj_model.*` (Resampler).
Only inference lives here; the sampler is in `dc_app.sampling`.
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..betas import dynamic_rescale_table, model_betas
from .autoencoder import AutoencoderKL
from .clip import OpenCLIPImageEmbedder, OpenCLIPTextEmbedder
from .dualref_decoder import DualRefAutoencoderKL
from .resampler import Resampler
from .token_chunking import TokenChunking
from .unet import UNetModel

# The schedule buffers every official checkpoint stores, in upstream's registration order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# First-stage models by the class name ending `first_stage_config.target` (upstream's import path).
FIRST_STAGE_CLASSES = {
    "AutoencoderKL": AutoencoderKL,  # DynamiCrafter: the image VAE, frames decoded independently
    "AutoencoderKL_Dualref": DualRefAutoencoderKL,  # ToonCrafter: temporal decoder fed with keyframe features
}


def first_stage_class(target: str | None):
    """The VAE class a config's `first_stage_config.target` names (no target: the image VAE)."""
    name = str(target or "AutoencoderKL").rsplit(".", 1)[-1]
    if name not in FIRST_STAGE_CLASSES:
        raise ValueError(f"first_stage_config.target={target!r}: expected one of {', '.join(FIRST_STAGE_CLASSES)}")
    return FIRST_STAGE_CLASSES[name]


def ddpm_buffers(betas: torch.Tensor, parameterization: str) -> dict[str, torch.Tensor]:
    """The float64 values of upstream's DDPM buffers for `betas`, in its registration order."""
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    if parameterization == "v":
        # Upstream registers the eps-only reciprocals as zeros for v models (1/sqrt(0) at t=999 otherwise).
        recip, recipm1 = torch.zeros_like(ac), torch.zeros_like(ac)
    else:
        recip, recipm1 = (1.0 / ac).sqrt(), (1.0 / ac - 1.0).sqrt()
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": recip,
        "sqrt_recipm1_alphas_cumprod": recipm1,
        "posterior_variance": posterior_variance,
        # clamp before the log: the posterior variance is exactly 0 at t = 0
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {name: values[name] for name in SCHEDULE_BUFFERS}


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the checkpoint's `model.diffusion_model.*` keys)."""

    def __init__(self, unet: nn.Module, conditioning_key: str):
        super().__init__()
        if conditioning_key != "hybrid":
            raise ValueError(f"conditioning_key={conditioning_key!r}: DynamiCrafter's released models use 'hybrid'")
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat, c_crossattn, **kwargs):
        # Hybrid conditioning: image latents join the noisy latent as channels, text+image tokens join as context.
        xc = torch.cat([x, *c_concat], dim=1)  # b (c + c_concat) t h w
        context = torch.cat(c_crossattn, dim=1)  # b l d
        return self.diffusion_model(xc, t, context=context, **kwargs)


class DynamiCrafter(nn.Module):
    """Inference-only DynamiCrafter built from an upstream-schema config (`cfg.model.params`)."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        p = cfg.model.params
        self.config = cfg

        self.parameterization = str(p.get("parameterization", "eps"))
        if self.parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization={self.parameterization!r}: expected 'eps' or 'v'")
        self.num_timesteps = int(p.get("timesteps", 1000))
        self.linear_start = float(p.get("linear_start", 0.00085))
        self.linear_end = float(p.get("linear_end", 0.012))
        self.rescale_betas_zero_snr = bool(p.get("rescale_betas_zero_snr", False))
        self.use_dynamic_rescale = bool(p.get("use_dynamic_rescale", False))
        self.base_scale = float(p.get("base_scale", 1.0))
        self.scale_factor = float(p.get("scale_factor", 0.18215))
        self.uncond_type = str(p.get("uncond_type", "empty_seq"))
        self.channels = int(p.get("channels", 4))
        self.image_size = tuple(int(s) for s in p.image_size)  # latent (h, w)
        # Decode one frame at a time unless a caller gives a chunk (upstream's model option of the same name).
        self.perframe_ae = bool(p.get("perframe_ae", False))

        unet_params = _plain(p.unet_config.params)
        self.temporal_length = int(unet_params.get("temporal_length", 16))
        open_clip_cfgs = _plain(cfg.get("open_clip_model_cfgs", None)) or None

        self.model = DiffusionWrapper(UNetModel(**unet_params), str(p.conditioning_key))
        vae_class = first_stage_class(p.first_stage_config.get("target"))
        self.first_stage_model = vae_class(**_plain(p.first_stage_config.params))
        self.cond_stage_model = OpenCLIPTextEmbedder(
            **_plain(p.cond_stage_config.get("params", {})), model_cfgs=open_clip_cfgs
        )
        self.embedder = OpenCLIPImageEmbedder(
            **_plain(p.img_cond_stage_config.get("params", {})), model_cfgs=open_clip_cfgs
        )
        self.image_proj_model = Resampler(**_plain(p.image_proj_stage_config.params))
        self._register_schedule()
        self._offloaded: set[str] = set()

    # ----------------------------------------------------------------------------------------- schedule
    def _register_schedule(self) -> None:
        """DDPM buffers, computed in float64 and stored as float32 exactly as upstream stores them."""
        betas = model_betas(self.linear_start, self.linear_end, self.num_timesteps, self.rescale_betas_zero_snr)
        for name, value in ddpm_buffers(betas, self.parameterization).items():
            self.register_buffer(name, value.to(torch.float32))
        if self.use_dynamic_rescale:
            table = dynamic_rescale_table(self.base_scale, self.num_timesteps)
            self.register_buffer("scale_arr", table.to(torch.float32))

    # ------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the UNet (schedule buffers stay float32 unless cast on purpose)."""
        return next(self.model.diffusion_model.parameters()).dtype

    @property
    def temporal_decoder(self) -> bool:
        """True when the VAE decodes chunks of frames together (ToonCrafter): its chunk is always
        `temporal_length` frames, so `perframe_ae` and a decode chunk size do not apply, and it wants the
        keyframes' reference features (`encode_keyframes`)."""
        return bool(getattr(self.first_stage_model, "temporal_decoder", False))

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> "DynamiCrafter":
        """Cast the networks to `dtype` (the VAE to `vae_dtype`, default float32), keeping the schedule float32.

        Upstream's `model.half()` also halves the schedule buffers, which changes which step counts give
        NaN; dc_app keeps them float32 so half precision changes speed, not the schedule.
        """
        for part in (self.model, self.cond_stage_model, self.embedder, self.image_proj_model):
            part.to(dtype=dtype)
        self.first_stage_model.to(dtype=vae_dtype or torch.float32)
        return self

    # ------------------------------------------------------------------------------------ conditioning
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Text context: (b, 77, d) from open_clip's penultimate layer, all positions."""
        with self._on_device("cond_stage_model") as text_encoder:
            return text_encoder(list(prompts)).float()

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Image context: CLIP tokens of images in [-1, 1] (b, 3, H, W) through the Resampler -> (b, 16*T, d)."""
        with self._on_device("embedder") as embedder, self._on_device("image_proj_model") as resampler:
            tokens = embedder(images.to(device=self.device, dtype=_param_dtype(embedder)))
            return resampler(tokens.to(_param_dtype(resampler))).float()

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        """UNet output (v or eps) for `cond = {"c_concat": [...], "c_crossattn": [...]}`; float32 out."""
        dtype = self.dtype
        c_concat = [c.to(dtype) for c in cond["c_concat"]]
        c_crossattn = [c.to(dtype) for c in cond["c_crossattn"]]
        kwargs.pop("unconditional_conditioning_img_nonetext", None)
        kwargs.pop("cfg_img", None)
        out = self.model(x_noisy.to(dtype), t, c_concat=c_concat, c_crossattn=c_crossattn, **kwargs)
        return out.float()

    # --------------------------------------------------------------------------------------------- VAE
    @torch.no_grad()
    def encode_first_stage(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, sample: bool = True, generator=None
    ) -> torch.Tensor:
        """Pixel video (b, 3, t, H, W) in [-1, 1] -> scaled latents (b, 4, t, h, w).

        Like upstream, the posterior is sampled (mean + std * noise) unless `sample=False` (the mean).
        `noise` ((b t), 4, h, w) injects the draws; otherwise one draw per frame comes from `generator`
        (or the global RNG), in frame order, as upstream's per-frame encoder draws them.
        """
        b, _, t, _, _ = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:])  # (b t) c H W
        frames = frames.to(self.vae_dtype)
        chunk = 1 if self.perframe_ae else frames.shape[0]
        latents = []
        with self._on_device("first_stage_model") as vae:
            for start in range(0, frames.shape[0], chunk):
                latents.append(self._encode_chunk(vae, frames[start : start + chunk], start, noise, sample, generator))
        z = torch.cat(latents) * self.scale_factor  # (b t) c h w
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # b c t h w

    @staticmethod
    def _encode_chunk(vae, frames, start, noise, sample, generator) -> torch.Tensor:
        posterior = vae.encode(frames)
        if not sample:
            return posterior.mode().float()
        if noise is not None:
            return posterior.sample(noise=noise[start : start + len(frames)].to(posterior.mean)).float()
        return posterior.sample(generator=generator).float()

    @torch.no_grad()
    def encode_keyframes(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, generator=None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For a temporal decoder: pixel video (b, 3, t, H, W) -> (scaled sampled latents (b, 4, t, h, w),
        the decoder's 5 references, each `b c 2 h w` = encoder features of frame 0 and frame t-1).

        Upstream's `get_latent_z_with_hidden_states`: every frame in ONE batched encode (perframe_ae is not
        consulted on this path) and one posterior draw of shape ((b t), 4, h, w), or `noise` of that shape.
        """
        if not self.temporal_decoder:
            raise ValueError("encode_keyframes: this model's VAE takes no reference features")
        b, _, t, _, _ = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:]).to(self.vae_dtype)
        with self._on_device("first_stage_model") as vae:
            posterior, references = vae.encode_with_references(frames, batch=b)
            z = posterior.sample(noise=noise, generator=generator).float() * self.scale_factor  # (b t) c h w
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4), references

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, chunk_size: int | None = None,
                           references: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Latents (b, 4, t, h, w) -> pixel video (b, 3, t, H, W), unclamped.

        `chunk_size` frames are decoded at once: 1 for `perframe_ae` models unless given, all otherwise.
        Per-frame and batched decode differ by float rounding only (<= 1e-5 on the tiny reference).
        A temporal decoder ignores `chunk_size` and takes `references` (see `_decode_temporal`).
        """
        if self.temporal_decoder:
            return self._decode_temporal(z, references)
        if references is not None:
            raise ValueError("decode_first_stage: this model's VAE takes no reference features")
        b, _, t, _, _ = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * t, *z.shape[1:2], *z.shape[3:]) / self.scale_factor
        frames = frames.to(self.vae_dtype)
        if chunk_size is None:
            chunk_size = 1 if self.perframe_ae else frames.shape[0]
        if chunk_size < 1:
            raise ValueError(f"decode chunk_size={chunk_size}: expected a positive number of frames")
        with self._on_device("first_stage_model") as vae:
            pixels = torch.cat([vae.decode(frames[s : s + chunk_size]).float() for s in range(0, len(frames), chunk_size)])
        # pixels: (b t) 3 H W
        return pixels.reshape(b, t, *pixels.shape[1:]).permute(0, 2, 1, 3, 4)  # b 3 t H W

    def _decode_temporal(self, z: torch.Tensor, references: list[torch.Tensor] | None) -> torch.Tensor:
        """ToonCrafter's decode: each video in consecutive chunks of `temporal_length` frames (the last may be
        shorter), every chunk given the same references, which it injects at ITS first and last frame.

        Upstream (`decode_core` with perframe_ae) chunks the flattened (b t) frames; it runs batch size 1 only,
        where that is the same as chunking each video. The chunk is never smaller: GroupNorm statistics, the
        Conv3d windows and the reference injection all span it, so a smaller chunk gives another video.
        """
        b, _, t, _, _ = z.shape
        frames = z.permute(0, 2, 1, 3, 4) / self.scale_factor  # b t c h w
        frames = frames.to(self.vae_dtype)
        chunk = self.temporal_length
        videos = []
        with self._on_device("first_stage_model") as vae:
            for i in range(b):
                refs = None if references is None else [r[i : i + 1].to(self.vae_dtype) for r in references]
                chunks = [frames[i, s : s + chunk] for s in range(0, t, chunk)]  # each (n c h w)
                videos.append(torch.cat([vae.decode(c, num_frames=len(c), references=refs).float() for c in chunks]))
        pixels = torch.stack(videos)  # b t 3 H W
        return pixels.permute(0, 2, 1, 3, 4)  # b 3 t H W

    # ------------------------------------------------------------------------------------ memory options
    def enable_offload(self, vae: bool = False) -> "DynamiCrafter":
        """Keep the text/image encoders (and optionally the VAE) in CPU RAM, moving each to the model's
        device only while it runs: they run once per request, so this trades a little time for VRAM."""
        self._offloaded = {"cond_stage_model", "embedder", "image_proj_model"} | ({"first_stage_model"} if vae else set())
        for name in self._offloaded:
            getattr(self, name).to("cpu")
        return self

    @property
    def offloaded(self) -> frozenset[str]:
        """Names of the parts `enable_offload` keeps in CPU RAM between uses (empty: none)."""
        return frozenset(self._offloaded)

    @contextlib.contextmanager
    def _on_device(self, name: str):
        part = getattr(self, name)
        if name not in self._offloaded or self.device.type == "cpu":
            yield part
            return
        part.to(self.device)
        try:
            yield part
        finally:
            part.to("cpu")

    def set_ff_chunk_size(self, tokens: int | None = None, budget_bytes: int | None = None) -> "DynamiCrafter":
        """Chunk the UNet's transformer blocks and feed-forwards: at most `tokens` tokens at once, or as many as
        keep one chunk's feed-forward temporaries within `budget_bytes`; neither: unchunked (the default).
        Same result up to float rounding, lower peak memory (see models/token_chunking.py)."""
        chunking = None
        if tokens is not None or budget_bytes is not None:
            chunking = TokenChunking(tokens=tokens, budget_bytes=budget_bytes)
        self.model.diffusion_model.set_token_chunking(chunking)
        return self

    @property
    def ff_chunking(self) -> TokenChunking | None:
        """What `set_ff_chunk_size` set (None: unchunked)."""
        return self.model.diffusion_model.token_chunking

    def compile_unet(self, **kwargs) -> "DynamiCrafter":
        """torch.compile the UNet (off by default: the first call compiles for minutes)."""
        self.model.diffusion_model = torch.compile(self.model.diffusion_model, **kwargs)
        return self

    # ----------------------------------------------------------------------------------- after loading
    def reset_nonpersistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild buffers a checkpoint does not carry (CLIP causal mask, image mean/std).

        Needed after a meta-device build + `load_state_dict(assign=True)`, which leaves them on meta.
        """
        device = device or self.device
        self.cond_stage_model.reset_nonpersistent_buffers(device)
        self.embedder.reset_nonpersistent_buffers(device)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _plain(node):
    """An omegaconf node as plain Python containers (constructors should not see DictConfig)."""
    if node is None:
        return None
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node
