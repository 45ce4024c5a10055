"""DynamiCrafter's video UNet (upstream `lvdm/modules/networks/openaimodel3d.py`, inference only).

A 2-D latent-diffusion UNet run on every frame (frames flattened into the batch), with a temporal
convolution in each ResBlock, a temporal transformer after each spatial transformer, one extra temporal
transformer (`init_attn`) after the stem, and a timestep + fs (fps / frame stride) embedding.

Module names are upstream's, typo included (`temopral_conv`), so the released checkpoints load with
`strict=True` and forward hooks on `time_embed`, `fps_embedding`, `input_blocks.k`, `init_attn`,
`middle_block`, `output_blocks.k` see the same tensors as upstream's.

Layouts: `b c t h w` = batch, channels, frames, height, width; `(b t) c h w` = frames flattened into the
batch, batch-major (row = batch_index * T + frame_index).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dc_app.models.attention import (TEXT_CONTEXT_TOKENS, BasicTransformerBlock, SpatialTransformer,
                                     TemporalTransformer)
from dc_app.models.normalization import GroupNorm32
from dc_app.models.token_chunking import TokenChunking

# The Resampler gives 16 image tokens per frame; upstream's UNet hard-codes this number (and the 77 text
# tokens) to recognise a per-frame image context of length 77 + 16 * T.
IMAGE_TOKENS_PER_FRAME = 16
# init_attn always has 8 heads (of num_head_channels each), whatever the width of the first level.
INIT_ATTN_HEADS = 8


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, float32: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)).

    timesteps: (n,) integer or float -> (n, dim) float32. Cosines come first, as upstream.
    """
    if dim % 2 != 0:
        raise ValueError(f"timestep embedding dim={dim}: expected an even number")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # n half
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def embedding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear (keys `.0`, `.2`): `time_embed` and `fps_embedding`."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class Downsample(nn.Module):
    """conv3x3, stride 2, padding 1 (key `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3 (key `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TemporalConv(nn.Conv3d):
    """The kernel-(3, 1, 1) Conv3d of the temporal convolutions, computed as a kernel-(3, 1) Conv2d.

    A kernel one pixel wide mixes nothing across h and w, so folding them into one axis, b c t (h w), is the
    same convolution. CPU conv3d takes a slow generic path here; conv2d's kernels run it ~3x faster on 1-2
    cores. Parameters stay the Conv3d's (checkpoint shape (c, c, 3, 1, 1)). Input and output `b c t h w`.
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        flat = x.reshape(batch, channels, frames, height * width)  # a view of the GroupNorm/SiLU output
        y = F.conv2d(flat, self.weight[..., 0], self.bias, padding=(1, 0))  # weight (o, i, 3, 1)
        return y.view(batch, -1, frames, height, width)


class TemporalConvBlock(nn.Module):
    """x + conv4(conv3(conv2(conv1(x)))) on `b c t h w`; each stage GN (eps 1e-5, over all frames) -> SiLU
    (-> Dropout) -> Conv3d with kernel (3, 1, 1): mixes each pixel with its neighbours in time only.

    Takes and returns `(b t) c h w`. Keys `conv1.0/conv1.2`, `conv{2,3,4}.0/.3`.
    """

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()

        def conv() -> nn.Conv3d:
            return TemporalConv(channels)

        self.conv1 = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv3 = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv4 = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch_frames, channels, height, width = x.shape
        batch = batch_frames // num_frames
        video = x.view(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)  # b c t h w
        h = self.conv4(self.conv3(self.conv2(self.conv1(video))))  # b c t h w
        h = h.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)  # (b t) c h w
        return x + h


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3, + per-channel timestep embedding, GN -> SiLU -> Dropout -> conv3x3, + skip;
    then the temporal convolution. GroupNorms have 32 groups, eps 1e-5, computed in float32.

    Input and output `(b t) c h w`; `emb` is `(b t) emb_channels` (the embedding repeated per frame).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        temporal_conv: bool = False,
    ):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        # Upstream hard-codes dropout 0.1 here; it only matters in training.
        self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1) if temporal_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (b t) c 1 1, broadcast over h w
        h = self.out_layers(h)
        h = self.skip_connection(x) + h
        if self.temopral_conv is not None:
            h = self.temopral_conv(h, num_frames)
        return h


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks (upstream's TimestepEmbedSequential).

    Hands each layer what it needs: ResBlocks the embedding, spatial transformers the per-frame context,
    temporal transformers the frame count; other layers (stem conv, Down/Upsample) just the features.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, num_frames)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """DynamiCrafter's video UNet. Build it with `UNetModel(**cfg.model.params.unet_config.params)`.

    forward(x `b c t h w`, timesteps `(b,)`, context `b L context_dim`, fs `(b,)` or None) -> `b c_out t h w`.
    Works in float32, float16 and bfloat16 (inputs are cast to the weights' dtype; the output comes back in
    the dtype of x).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_head_channels: int = 64,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        temporal_conv: bool = False,
        temporal_attention: bool = True,
        temporal_selfatt_only: bool = True,
        use_relative_position: bool = False,
        use_causal_attention: bool = False,
        temporal_length: int | None = None,
        addition_attention: bool = False,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
        default_fs: int = 4,
        fs_condition: bool = False,
    ):
        super().__init__()
        # Settings the released models never use: fail loudly rather than silently run something else.
        if use_relative_position:
            raise ValueError("use_relative_position=True is not supported: the released models use False")
        if use_causal_attention:
            raise ValueError("use_causal_attention=True is not supported: the released models use False")
        if not temporal_selfatt_only:
            raise ValueError("temporal_selfatt_only=False is not supported: the released models use True")
        if context_dim is None:
            raise ValueError("context_dim=None is not supported: expected the width of the text/image context")
        if num_head_channels <= 0:
            raise ValueError(f"num_head_channels={num_head_channels}: expected a positive head width")
        if image_cross_attention_scale_learnable and not image_cross_attention:
            raise ValueError("image_cross_attention_scale_learnable=True needs image_cross_attention=True")
        # use_checkpoint (gradient checkpointing) and temporal_length (only read by the relative-position and
        # causal options rejected above) have no effect at inference.
        del use_checkpoint

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        self.temporal_length = temporal_length
        self.default_fs = int(default_fs)
        self.fs_condition = fs_condition
        self.addition_attention = addition_attention
        time_embed_dim = model_channels * 4
        self.token_chunking: TokenChunking | None = None  # see set_token_chunking

        def res_block(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, temporal_conv=temporal_conv)

        def attention_layers(ch: int) -> list[nn.Module]:
            if ch % num_head_channels != 0:
                raise ValueError(f"{ch} channels: expected a multiple of num_head_channels={num_head_channels}")
            heads = ch // num_head_channels
            layers: list[nn.Module] = [
                SpatialTransformer(
                    ch,
                    heads,
                    num_head_channels,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    use_linear=use_linear,
                    image_cross_attention=image_cross_attention,
                    image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                )
            ]
            if temporal_attention:
                layers.append(
                    TemporalTransformer(
                        ch, heads, num_head_channels, depth=transformer_depth, use_linear=use_linear
                    )
                )
            return layers

        self.time_embed = embedding_mlp(model_channels, time_embed_dim)
        if fs_condition:
            self.fps_embedding = embedding_mlp(model_channels, time_embed_dim)

        # Input blocks: stem, then per level num_res_blocks ResBlocks (with attention at the listed
        # downsampling rates) and a Downsample except after the last level.
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attention_layers(ch)
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # Registered after input_blocks (upstream's state_dict order); it always uses Conv1d projections.
        if addition_attention:
            self.init_attn = UNetBlock(
                TemporalTransformer(
                    model_channels, INIT_ATTN_HEADS, num_head_channels, depth=transformer_depth, use_linear=False
                )
            )

        # The middle block always has attention, whatever attention_resolutions says.
        self.middle_block = UNetBlock(res_block(ch, ch), *attention_layers(ch), res_block(ch, ch))

        # Output blocks mirror the input blocks, each eating one skip; an Upsample ends every level but the first.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attention_layers(ch)
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def set_token_chunking(self, chunking: TokenChunking | None) -> None:
        """Run every transformer block (spatial and temporal) over chunks of tokens (None: all at once)."""
        self.token_chunking = chunking
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                module.chunking = chunking

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in: that of its weights (read from a bias: an 8-bit stored weight would be
        rebuilt just to be asked its dtype)."""
        return self.time_embed[0].bias.dtype

    @staticmethod
    def _per_sample(
        value: torch.Tensor | int | float, batch: int, name: str, device: torch.device
    ) -> torch.Tensor:
        """A scalar or a (batch,) tensor -> a (batch,) tensor on `device`."""
        value = torch.as_tensor(value, device=device)
        if value.ndim == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} has shape {tuple(value.shape)}: expected a scalar or ({batch},)")
        return value

    def _frame_context(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """b L c -> (b t) L' c: the context each frame's cross-attention sees.

        A context of exactly 77 + 16 t tokens is text + per-frame image tokens (frame f owns image tokens
        16 f .. 16 f + 15): each frame gets the 77 text tokens and its own 16. Any other length is given
        to every frame unchanged. Both numbers are hard-coded upstream.
        """
        batch, length, width = context.shape
        if length == TEXT_CONTEXT_TOKENS + IMAGE_TOKENS_PER_FRAME * num_frames:
            text = context[:, :TEXT_CONTEXT_TOKENS].repeat_interleave(num_frames, dim=0)  # (b t) 77 c
            image = context[:, TEXT_CONTEXT_TOKENS:].reshape(
                batch * num_frames, IMAGE_TOKENS_PER_FRAME, width
            )  # b (t 16) c -> (b t) 16 c
            return torch.cat([text, image], dim=1)  # (b t) 93 c
        return context.repeat_interleave(num_frames, dim=0)  # (b t) L c

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int,
        context: torch.Tensor | None = None,
        fs: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """x: b c_in t h w; timesteps: (b,) or scalar; context: b L context_dim; fs: (b,), scalar or None
        (None: default_fs for every sample) -> b c_out t h w, in the dtype of x."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (b, {self.in_channels}, t, h, w)")
        batch, _, num_frames, height, width = x.shape
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"latent size {height}x{width}: expected both sides divisible by {factor}")
        if context is None or context.ndim != 3 or context.shape[0] != batch:
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"context has shape {shape}: expected ({batch}, L, context_dim)")
        dtype = self.dtype

        # Embeddings: sinusoids in float32, MLPs in the model dtype. Adding the fs embedding before the
        # per-frame repeat is the same as upstream's adding after it (identical rows).
        timesteps = self._per_sample(timesteps, batch, "timesteps", x.device)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # b 4mc
        if self.fs_condition:
            fs = self.default_fs if fs is None else fs
            fs = self._per_sample(fs, batch, "fs", x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, self.model_channels).to(dtype))  # b 4mc
        emb = emb.repeat_interleave(num_frames, dim=0)  # (b t) 4mc
        context = self._frame_context(context.to(dtype), num_frames)  # (b t) L' c

        h = x.to(dtype).permute(0, 2, 1, 3, 4).reshape(batch * num_frames, -1, height, width)  # (b t) c h w
        skips = []
        for index, block in enumerate(self.input_blocks):
            h = block(h, emb, context, num_frames)
            if index == 0 and self.addition_attention:
                h = self.init_attn(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        y = self.out(h)  # (b t) c_out h w

        y = y.view(batch, num_frames, self.out_channels, height, width).permute(0, 2, 1, 3, 4)  # b c t h w
        return y.contiguous().to(x.dtype)
