"""The KL autoencoder (VAE) of latent diffusion: pixels (N, 3, H, W) <-> latents (N, 4, H/8, W/8).

DynamiCrafter uses the Stable Diffusion VAE unchanged and runs it on single frames: a video is encoded or
decoded with its frames flattened into the batch, so everything here works on plain 4-D image batches.
The module and parameter names mirror upstream's `first_stage_model.*` keys exactly, so the official
checkpoint loads with `strict=True`.

The `scale_factor` (0.18215) is NOT applied here: it belongs to the diffusion model, which multiplies
after encoding and divides before decoding.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dc_app.models.attention_kernel import dot_product_attention
from dc_app.models.normalization import GroupNorm32

# Upstream clamps the posterior log-variance to this range before taking exp().
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """The encoder's posterior: independent Gaussians per latent element, from the quant_conv output.

    `moments` (N, 2 * C, h, w): the first C channels are the mean, the last C the log-variance.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2 != 0:
            raise ValueError(f"moments: expected (N, 2*C, h, w) with an even channel count, got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)  # each (N, C, h, w)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn from N(0, 1) unless given (tests inject recorded draws).

        Without a generator the draw comes from the global CPU RNG in float32 and is then moved, as upstream
        does, so a seeded run consumes the same random stream on any device. With a generator the draw happens
        on that generator's device.
        """
        if noise is None:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        if noise.shape != self.mean.shape:
            raise ValueError(f"noise: expected shape {tuple(self.mean.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent (the mean): a deterministic alternative to sample()."""
        return self.mean


def normalize(channels: int) -> GroupNorm32:
    # The VAE uses 32 groups with eps 1e-6 everywhere (the UNet's ResBlocks use 1e-5; not this one).
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1 conv shortcut when the width changes.

    No timestep embedding (the VAE has none) and no dropout (inference only; upstream's rate is 0 anyway).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU in place on the norm's fresh output: the same numbers, one full-size temporary fewer (the VAE's
        # peak is at full resolution, 128 channels per frame).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        hidden = self.norm(x)

        def to_tokens(t: torch.Tensor) -> torch.Tensor:
            # (n, c, h, w) -> (n, 1, h*w, c): one head whose features are the channels
            return t.reshape(n, c, h * w).transpose(1, 2).unsqueeze(1)

        q, k, v = to_tokens(self.q(hidden)), to_tokens(self.k(hidden)), to_tokens(self.v(hidden))
        out = dot_product_attention(q, k, v)  # (n, 1, h*w, c), scale c^-1/2 as upstream
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)  # (n, 1, h*w, c) -> (n, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3x3; the padding is asymmetric (right/bottom only), as upstream."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (keys mid.block_1 / attn_1 / block_2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each followed by an AttnBlock when the level has attention) and an
    optional resampler. A plain container so the keys read down.i.block.j / down.i.attn.j / down.i.downsample."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample_name: str | None,
                 resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample_name = resample_name
        if resample_name is not None:
            self.add_module(resample_name, resample)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The level's ResnetBlocks (and AttnBlocks), without the resampler."""
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return x

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_name is None:
            return x
        return getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    """(N, in_channels, H, W) -> (N, 2*z_channels, H/2^(L-1), W/2^(L-1)) with L = len(ch_mult)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        levels = []
        block_in = ch
        curr_res = resolution
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            is_last = i_level == len(ch_mult) - 1
            # Every level but the last halves the resolution.
            levels.append(Level(blocks, attns, None if is_last else "downsample",
                                None if is_last else Downsample(block_in)))
            if not is_last:
                curr_res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden_states(x)[0]

    def forward_with_hidden_states(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder output and the features ToonCrafter's decoder takes as references.

        Hidden states, as upstream's `Encoder.forward(return_hidden_states=True)` lists them: for each level i the
        output of its last block before the downsample (ch*ch_mult[i] channels at H/2^i), then the `conv_in`
        output (ch channels at full resolution) last.
        """
        stem = self.conv_in(x)
        hidden = []
        h = stem
        for level in self.down:
            h = level.blocks(h)
            hidden.append(h)
            h = level.resample(h)
        hidden.append(stem)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)), hidden


class Decoder(nn.Module):
    """(N, z_channels, h, w) -> (N, out_ch, h*2^(L-1), w*2^(L-1)); levels run from the deepest (up.{L-1}) to up.0."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in)
        levels: list[Level] = []
        for i_level in reversed(range(num_levels)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            # The decoder has one more ResnetBlock per level than the encoder.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            is_first = i_level == 0
            levels.insert(0, Level(blocks, attns, None if is_first else "upsample",
                                   None if is_first else Upsample(block_in)))
            if not is_first:
                curr_res *= 2
        # Stored in resolution order (up.0 = full resolution) to match the checkpoint's key indices.
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            # The blocks run here, not in a method of the level: a callee's argument would keep the level's
            # input (its widest tensor) alive through all its blocks; here it is freed after the first one.
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """LDM's KL-regularised autoencoder; `encode` returns the posterior, `decode` maps latents back to pixels.

    Args follow upstream's `first_stage_config.params`: `embed_dim` (latent channels, 4) and `ddconfig`
    (ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, out_ch, resolution, z_channels, double_z,
    dropout). Training-only params (`monitor`, `lossconfig`, ...) are accepted and ignored.
    """

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any], **ignored: Any):
        super().__init__()
        cfg = dict(ddconfig)
        if not cfg.get("double_z", True):
            raise ValueError(f"ddconfig.double_z={cfg['double_z']!r}: expected True (a KL VAE predicts mean and logvar)")
        self.in_channels = int(cfg["in_channels"])
        self.embed_dim = int(embed_dim)
        common = dict(
            ch=int(cfg["ch"]),
            ch_mult=[int(m) for m in cfg["ch_mult"]],
            num_res_blocks=int(cfg["num_res_blocks"]),
            attn_resolutions=[int(r) for r in cfg.get("attn_resolutions", [])],
            resolution=int(cfg["resolution"]),
            z_channels=int(cfg["z_channels"]),
        )
        self.encoder = Encoder(in_channels=self.in_channels, double_z=True, **common)
        self.decoder = Decoder(out_ch=int(cfg["out_ch"]), **common)
        z_channels = common["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * self.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Pixels (N, in_channels, H, W) in [-1, 1] -> posterior over (N, embed_dim, H/f, W/f) latents."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"encode: expected (N, {self.in_channels}, H, W) frames, got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (N, embed_dim, h, w) -> pixels (N, out_ch, h*f, w*f), roughly in [-1, 1], unclamped."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"decode: expected (N, {self.embed_dim}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
