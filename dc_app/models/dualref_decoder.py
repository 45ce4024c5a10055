"""ToonCrafter's dual-reference video VAE decoder (upstream `AutoencoderKL_Dualref` / `VideoDecoder`).

ToonCrafter is DynamiCrafter 512 interpolation fine-tuned on cartoons, with one architectural change: the VAE
decoder is temporal and sees the keyframes. Compared with the LDM decoder of `autoencoder.py` it
  * follows every ResnetBlock with a temporal block (GroupNorm over the whole chunk, Conv3d with kernel (3, 1, 1))
    and blends the two by a learned factor (`VideoResBlock`);
  * ends with a Conv3d across frames after its last 2-D conv (`TemporalConvOut`);
  * takes encoder features of the first and last input frame (the "references") and injects them after each
    level: a 1x1 conv added onto the first and last frame of the chunk (`Combiner`, levels 0, 1 and the final one)
    or cross-attention of every frame onto both frames' tokens (`ReferenceCrossAttention`, levels 2 and 3).
So a decode call sees one chunk of consecutive frames of one video, and its output depends on the chunk: which
frames are first and last (references go there) and which frames share GroupNorm statistics and Conv3d windows.

Module names are upstream's, so the released checkpoint loads with `strict=True`. Facts and file:line citations:
../shared/reference/tooncrafter/README.md (sections 2.1-2.5), docs/tooncrafter.md.

Layouts: `(b t) c h w` = frames flattened into the batch, batch-major; `b c l h w` = references, l = 2
(0: first frame, 1: last frame).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dc_app.models.attention_kernel import dot_product_attention
from dc_app.models.autoencoder import AttnBlock, AutoencoderKL, DiagonalGaussian, ResnetBlock, Upsample, normalize
from dc_app.models.normalization import GroupNorm32
from dc_app.models.unet import TemporalConv

# The decoder levels whose references go through cross-attention; the others (and the final one) use a Combiner.
# Upstream's `attn_level=[2, 3]` constructor default; the released yaml does not set it.
CROSS_ATTENTION_LEVELS = (2, 3)
# Upstream builds the fusion cross-attention with its constructor defaults: 8 heads of 64, whatever the width.
FUSION_HEADS, FUSION_HEAD_DIM = 8, 64


def frames_to_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b t) c h w -> b c t h w."""
    bt, c, h, w = x.shape
    return x.reshape(bt // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """b c t h w -> (b t) c h w."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


class TimeStack(nn.Module):
    """x + out_layers(in_layers(x)) on `b c t h w`; each half GN -> SiLU (-> Dropout) -> Conv3d (3, 1, 1).

    Upstream's `ResBlock(dims=3, skip_t_emb=True)`: no timestep embedding (it adds zeros), identity skip.
    Its GroupNorm is `lvdm.basics.normalization` (eps 1e-5, float32) applied to the 5-D tensor, so the
    statistics span every frame of the decoded chunk: a frame's output depends on which frames share its chunk.
    Keys `in_layers.0/.2`, `out_layers.0/.3` (index 2 of out_layers is the Dropout, inactive at inference).
    """

    def __init__(self, channels: int):
        super().__init__()
        # SiLU in place on the norm's fresh output: the same numbers, one temporary of the whole chunk fewer.
        self.in_layers = nn.Sequential(GroupNorm32(32, channels, eps=1e-5), nn.SiLU(inplace=True),
                                       TemporalConv(channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, channels, eps=1e-5), nn.SiLU(inplace=True), nn.Identity(), TemporalConv(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResBlock(ResnetBlock):
    """The LDM ResnetBlock per frame, then a TimeStack across frames, blended: a·time + (1 − a)·spatial.

    a = sigmoid(mix_factor), a learned scalar (upstream's merge_strategy "learned"; init 0, so a = 0.5).
    `mix_factor` is this module's own parameter, so it comes first in the state_dict, as in the checkpoint.
    Input and output `(b t) c h w`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.mix_factor = nn.Parameter(torch.zeros(1))
        self.time_stack = TimeStack(out_channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        spatial = frames_to_video(super().forward(x), num_frames)  # b c t h w
        alpha = torch.sigmoid(self.mix_factor)
        # a·time + (1 − a)·spatial with the same roundings, into time_stack's fresh output: a chunk-sized
        # temporary fewer than the expression would make.
        blended = self.time_stack(spatial).mul_(alpha).add_((1.0 - alpha) * spatial)
        return video_to_frames(blended)


class TemporalConvOut(nn.Conv2d):
    """Upstream's `AE3DConv` as conv_out: the 2-D conv3x3 (keys `conv_out.weight/bias`), then `time_mix_conv`,
    a Conv3d across frames with kernel (3, 1, 1), zero padding in time and no residual. `(b t) c h w` in and out."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_mix_conv = TemporalConv(out_channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        spatial = super().forward(x)
        return video_to_frames(self.time_mix_conv(frames_to_video(spatial, num_frames)))


class Combiner(nn.Module):
    """Adds conv1x1(first reference) to the chunk's first frame and conv1x1(last reference) to its last frame.

    Upstream zero-initialises the conv, so an untrained Combiner is the identity. With a one-frame chunk both
    adds land on the same frame, as upstream's `x[:, :, 0]` then `x[:, :, -1]` do.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, c, l, h, w = reference.shape
        projected = self.conv(video_to_frames(reference)).view(b, l, c, h, w)  # b l c h w
        # Upstream adds in place on a view of its input; dc_app adds onto a copy so the caller's tensor is kept.
        video = x.reshape(b, num_frames, *x.shape[1:]).clone()  # b t c h w
        video[:, 0] += projected[:, 0]
        video[:, -1] += projected[:, 1]
        return video.view_as(x)


class ReferenceCrossAttention(nn.Module):
    """Every frame's tokens attend to the first and last reference frames' tokens; x + to_out(attention).

    Upstream's `MemoryEfficientCrossAttentionWrapperFusion`: q = to_q(GroupNorm(x)) (eps 1e-6), but k and v come
    from the UN-normalised reference features; the keys are [first-frame tokens; last-frame tokens] (2·h·w),
    8 heads of 64 (inner 512 whatever the width), scale 64^-1/2, heads are contiguous channel groups.
    to_q/to_k/to_v have no bias; to_out is Linear(512 -> C) with bias (zero-initialised upstream).
    State-dict order as upstream: to_q, to_k, to_v, to_out.0, norm.
    """

    def __init__(self, channels: int, heads: int = FUSION_HEADS, dim_head: int = FUSION_HEAD_DIM):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, channels))
        self.norm = normalize(channels)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L, heads*d) -> (n, heads, L, d)."""
        n, length, _ = tokens.shape
        return tokens.view(n, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        b, _, l, _, _ = reference.shape
        queries = self.norm(x).flatten(2).transpose(1, 2)  # (b t) (h w) c
        q = self._split_heads(self.to_q(queries))  # (b t) heads (h w) d
        # One key/value sequence per video: both reference frames' tokens, first frame first.
        ref_tokens = reference.permute(0, 2, 3, 4, 1).reshape(b, l * h * w, c)  # b (l h w) c
        k, v = self._split_heads(self.to_k(ref_tokens)), self._split_heads(self.to_v(ref_tokens))  # b heads (l h w) d
        # Every frame of a video attends to the same keys. expand + reshape is a view (no copy) for one video,
        # which is how the model decodes; the keys of the real model's level 2 are 20,480 tokens per frame.
        k = k[:, None].expand(b, num_frames, *k.shape[1:]).reshape(bt, *k.shape[1:])
        v = v[:, None].expand(b, num_frames, *v.shape[1:]).reshape(bt, *v.shape[1:])
        out = dot_product_attention(q, k, v)  # (b t) heads (h w) d, scale d^-1/2
        out = out.transpose(1, 2).reshape(bt, h * w, self.heads * self.dim_head)
        out = self.to_out(out).transpose(1, 2).reshape(bt, c, h, w)
        return x + out


class VideoMidBlock(nn.Module):
    """VideoResBlock -> single-head AttnBlock (per frame) -> VideoResBlock (keys mid.block_1 / attn_1 / block_2).

    Upstream's `MemoryEfficientAttnBlock` is the LDM AttnBlock's math with the xformers kernel; here it is the
    same AttnBlock as the image VAE, on dc_app's attention kernel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = VideoResBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = VideoResBlock(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, num_frames)), num_frames)


class VideoUpLevel(nn.Module):
    """One decoder level: VideoResBlocks (each followed by an AttnBlock if the level has attention), then the
    optional nearest x2 + conv3x3 upsample. Keys up.i.block.j / up.i.attn.j / up.i.upsample.conv. A container:
    DualRefDecoder.forward runs its blocks."""

    def __init__(self, blocks: list[VideoResBlock], attns: list[AttnBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if upsample is not None:
            self.upsample = upsample

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x) if hasattr(self, "upsample") else x


class DualRefDecoder(nn.Module):
    """(b·t, z_channels, h, w) latents of ONE chunk of t consecutive frames -> (b·t, out_ch, H, W) pixels.

    `references`: the list of 5 encoder features (`b c l h w`, section 2.2 of the reference README) or None.
    Order of operations (upstream `Decoder.forward`): conv_in -> mid -> for level i = L-1 .. 0: its blocks, then
    the level's reference injection `attn_refinement[i]`, then the upsample -> norm_out -> SiLU ->
    `attn_refinement[L]` -> conv_out. No tanh. Without references the injections are skipped.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (num_levels - 1)
        self.num_levels = num_levels
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = VideoMidBlock(block_in)
        levels: list[VideoUpLevel] = []
        refinements: list[nn.Module] = []
        for i_level in reversed(range(num_levels)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(VideoResBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            is_first = i_level == 0
            levels.insert(0, VideoUpLevel(blocks, attns, None if is_first else Upsample(block_in)))
            # Injection after this level's blocks, at the level's width (before its upsample).
            refinements.insert(0, ReferenceCrossAttention(block_in) if i_level in CROSS_ATTENTION_LEVELS
                               else Combiner(block_in))
            if not is_first:
                curr_res *= 2
        self.up = nn.ModuleList(levels)
        # The final injection (index L), at full resolution after norm_out and SiLU, is always a Combiner.
        refinements.append(Combiner(block_in))
        self.attn_refinement = nn.ModuleList(refinements)
        self.norm_out = normalize(block_in)
        self.conv_out = TemporalConvOut(block_in, out_ch)

    def forward(self, z: torch.Tensor, num_frames: int, references: Sequence[torch.Tensor] | None = None
                ) -> torch.Tensor:
        if z.shape[0] % num_frames != 0:
            raise ValueError(f"decoder: {z.shape[0]} frames is not a whole number of {num_frames}-frame chunks")
        if references is not None and len(references) != self.num_levels + 1:
            raise ValueError(f"decoder: expected {self.num_levels + 1} reference features, got {len(references)}")
        h = self.mid(self.conv_in(z), num_frames)
        for i_level in reversed(range(self.num_levels)):
            level = self.up[i_level]
            # The blocks run here, not in a method of the level: a callee's argument would keep the level's
            # input (the widest tensor of the level, a whole chunk at full resolution at level 0) alive through
            # all its blocks; here it is freed once the first block is done.
            for i, block in enumerate(level.block):
                h = block(h, num_frames)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if references:
                h = self.attn_refinement[i_level](h, references[i_level], num_frames)
            h = level.resample(h)
        h = F.silu(self.norm_out(h), inplace=True)
        if references:
            h = self.attn_refinement[-1](h, references[-1], num_frames)
        return self.conv_out(h, num_frames)


def first_and_last(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """One encoder feature `(b t) c h w` -> the reference `b c 2 h w` of its first and last frame."""
    video = frames_to_video(hidden, hidden.shape[0] // batch)  # b c t h w
    return torch.stack([video[:, :, 0], video[:, :, -1]], dim=2)


class DualRefAutoencoderKL(AutoencoderKL):
    """ToonCrafter's VAE: the LDM encoder, `quant_conv` and `post_quant_conv` as before, the dual-reference decoder.

    `post_quant_conv` is loaded (the checkpoint has it) but never applied: upstream's `decode` skips it whenever
    keyword arguments are passed, and ToonCrafter always passes `timesteps` (reference README section 2.4).
    `temporal_decoder` tells callers that a decode call must receive whole chunks of consecutive frames.
    """

    temporal_decoder = True

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any], **ignored: Any):
        super().__init__(embed_dim, ddconfig, **ignored)
        cfg = dict(ddconfig)
        # Replace the image decoder; same attribute name so the keys stay `decoder.*`.
        self.decoder = DualRefDecoder(
            ch=int(cfg["ch"]),
            out_ch=int(cfg["out_ch"]),
            ch_mult=[int(m) for m in cfg["ch_mult"]],
            num_res_blocks=int(cfg["num_res_blocks"]),
            attn_resolutions=[int(r) for r in cfg.get("attn_resolutions", [])],
            resolution=int(cfg["resolution"]),
            z_channels=int(cfg["z_channels"]),
        )

    def encode_with_references(self, x: torch.Tensor, batch: int) -> tuple[DiagonalGaussian, list[torch.Tensor]]:
        """Frames `(b t) c H W` of `batch` videos -> (posterior, the 5 references `b c 2 h w`).

        The references are the encoder hidden states of each video's first and last frame.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[0] % batch != 0:
            raise ValueError(f"encode: expected (b*t, {self.in_channels}, H, W) frames of {batch} videos, "
                             f"got {tuple(x.shape)}")
        moments, hidden = self.encoder.forward_with_hidden_states(x)
        return DiagonalGaussian(self.quant_conv(moments)), [first_and_last(hs, batch) for hs in hidden]

    def decode(self, z: torch.Tensor, num_frames: int | None = None,
               references: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Unscaled latents `(b t) c h w`, t = `num_frames` consecutive frames of each video -> pixels.

        No `post_quant_conv`, with or without references (see the class docstring).
        """
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"decode: expected (N, {self.embed_dim}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(z, z.shape[0] if num_frames is None else num_frames, references)
