"""DynamiCrafter's transformer layers: cross-attention with an image branch, GEGLU, and the spatial and
temporal transformers that the UNet interleaves with its ResBlocks.

Module and parameter names follow upstream (`lvdm/modules/attention.py`) exactly, so the released checkpoints
load with `strict=True`. Every attention goes through `attention_kernel.dot_product_attention` with tensors laid
out (batch, heads, L, d_head), which is the layout SDPA's fused kernels want.

Layouts: `(b t) c h w` = frames flattened into the batch, batch-major (row = batch_index * T + frame_index).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dc_app.models.attention_kernel import dot_product_attention
from dc_app.models.normalization import GroupNorm32
from dc_app.models.token_chunking import TokenChunking

# The UNet feeds every spatial cross-attention a context of 77 text tokens followed by the image tokens.
# Upstream hard-codes the split point (`text_context_len=77`), the length of an open_clip text sequence.
TEXT_CONTEXT_TOKENS = 77


class TokenConv1d(nn.Conv1d):
    """A kernel-size-1 Conv1d (upstream's `init_attn` projections) applied to channels-last tokens.

    Keeps Conv1d's parameter shape (out, in, 1) for the checkpoint, but takes (..., in) tokens and runs as a
    Linear, so the temporal transformer never has to transpose its sequences to (N, c, t) and back.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :, 0], self.bias)  # weight (out, in, 1) -> (out, in)


class TokenConv2d(nn.Conv2d):
    """A 1x1 Conv2d (a SpatialTransformer with use_linear=False) applied to channels-last tokens (..., in)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :, 0, 0], self.bias)  # weight (out, in, 1, 1) -> (out, in)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is None).

    With `image_cross_attention`, the context is split at token 77: the text part goes through to_k/to_v,
    the image part through to_k_ip/to_v_ip, the same queries attend to each with its own softmax, and
    out = out_text + lambda * out_image, lambda = 1, or tanh(alpha) + 1 when the scale is learnable (256 model).
    Without the image branch, a given context is cut to its first 77 tokens, as upstream does.
    Heads are contiguous groups of dim_head channels of the inner dimension.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale_learnable = image_cross_attention_scale_learnable
        if image_cross_attention_scale_learnable:
            if not image_cross_attention:
                raise ValueError("image_cross_attention_scale_learnable=True needs image_cross_attention=True")
            # Upstream initialises alpha to 0, i.e. lambda = tanh(0) + 1 = 1; the checkpoint sets its value.
            self.alpha = nn.Parameter(torch.zeros(()))

        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # Dropout after the output Linear keeps the checkpoint's key names `to_out.0.*`.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B L (heads d) -> B heads L d (a view: SDPA accepts the strides as they are)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)  # B heads L d

    def image_scale(self) -> torch.Tensor | float:
        """lambda, the weight of the image branch."""
        if self.image_cross_attention_scale_learnable:
            return torch.tanh(self.alpha) + 1
        return 1.0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: B Lq query_dim; context: B Lc context_dim or None -> B Lq query_dim."""
        q = self._split_heads(self.to_q(x))  # B heads Lq d
        if context is None:
            text = x
            image = None
        else:
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"context batch {context.shape[0]} != query batch {x.shape[0]}: "
                    "expected one context per query row"
                )
            text = context[:, :TEXT_CONTEXT_TOKENS]
            # A context of text tokens only (length <= 77) gives an empty image part; upstream's softmax over
            # zero keys then contributes exactly 0, so skipping the branch is the same result.
            has_image = self.image_cross_attention and context.shape[1] > TEXT_CONTEXT_TOKENS
            image = context[:, TEXT_CONTEXT_TOKENS:] if has_image else None

        k = self._split_heads(self.to_k(text))  # B heads Lk d
        v = self._split_heads(self.to_v(text))  # B heads Lk d
        out = dot_product_attention(q, k, v)  # B heads Lq d
        if image is not None:
            k_ip = self._split_heads(self.to_k_ip(image))  # B heads Li d
            v_ip = self._split_heads(self.to_v_ip(image))  # B heads Li d
            out_image = dot_product_attention(q, k_ip, v_ip)
            if self.image_cross_attention_scale_learnable:
                out_image = out_image * self.image_scale()
            # (lambda is the constant 1 otherwise: no multiply-by-one pass over the whole output.)
            out = out + out_image

        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)  # B Lq (heads d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear(d -> 2 d_out); the first half is the value, the second the gate: value * GELU(gate) (erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of the transformer blocks: d -> 4d (gated) -> d. Keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        """x: ... dim. With `chunk_tokens`, at most that many tokens go through the 4x-wide GEGLU at once
        (it is per token, so only float rounding can tell the difference)."""
        tokens = x.reshape(-1, x.shape[-1])
        if chunk_tokens is None or tokens.shape[0] <= chunk_tokens:
            return self.net(x)
        out = tokens.new_empty(tokens.shape[0], self.net[2].out_features)
        for start in range(0, tokens.shape[0], chunk_tokens):
            out[start:start + chunk_tokens] = self.net(tokens[start:start + chunk_tokens])
        return out.view(*x.shape[:-1], out.shape[-1])


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: x += attn1(LN x) (self); x += attn2(LN x, context); x += FF(LN x).

    attn2 attends to `context` when given, else it is a second self-attention (the temporal transformers).
    Submodules are registered in upstream's order (attn1, ff, attn2, norm1..3) so state_dict order matches.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(
            dim,
            context_dim=context_dim,
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
            image_cross_attention=image_cross_attention,
            image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        # Low-memory path (set by UNetModel.set_token_chunking); None: all sequences at once.
        self.chunking: TokenChunking | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: B L dim; context: B Lc context_dim or None.

        With `chunking`, the block runs over groups of whole sequences (attention needs a sequence whole) of
        at most the chunk's tokens, and the feed-forward over at most that many tokens of a longer sequence.
        """
        if self.chunking is None:
            return self._block(x, context, None)
        batch, length, width = x.shape
        chunk_tokens = self.chunking.tokens_for(width, x.element_size())
        if batch * length <= chunk_tokens:
            return self._block(x, context, None)
        sequences = max(1, chunk_tokens // length)
        out = torch.empty_like(x)
        for start in range(0, batch, sequences):
            rows = slice(start, start + sequences)
            out[rows] = self._block(x[rows], None if context is None else context[rows], chunk_tokens)
        return out

    def _block(self, x: torch.Tensor, context: torch.Tensor | None, chunk_tokens: int | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x), chunk_tokens) + x
        return x


class SpatialTransformer(nn.Module):
    """Attention over the h*w positions of each frame: GN (eps 1e-6) -> proj_in -> blocks -> proj_out -> + input.

    Input and output are `(b t) c h w`; `context` has one row per frame, `(b t) L context_dim`.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else TokenConv2d(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                image_cross_attention=image_cross_attention,
                image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels) if use_linear else TokenConv2d(inner_dim, in_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        frames, channels, height, width = x.shape
        h = self.norm(x)
        # A 1x1 conv and a Linear are the same map on channels-last tokens, so both variants share this path.
        h = h.permute(0, 2, 3, 1).reshape(frames, height * width, channels)  # (b t) (h w) c
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        h = self.proj_out(h)
        h = h.view(frames, height, width, channels).permute(0, 3, 1, 2)  # (b t) c h w
        return h + x


class TemporalTransformer(nn.Module):
    """Self-attention along time at every pixel: GN (eps 1e-6) over `b c t h w` (statistics span all frames)
    -> sequences of length t for every (b, h, w) -> proj_in -> blocks -> proj_out -> + input.

    Takes and returns `(b t) c h w` (the UNet's working layout) plus the frame count. Projections are
    Linear (`use_linear`) or kernel-1 Conv1d (`init_attn`). The released models use neither relative
    positions nor a causal mask, and attn2 is a second self-attention (temporal_selfatt_only).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else TokenConv1d(in_channels, inner_dim)
        # context_dim=None: attn2's keys and values come from the sequence itself.
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels) if use_linear else TokenConv1d(inner_dim, in_channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch_frames, channels, height, width = x.shape
        if batch_frames % num_frames != 0:
            raise ValueError(f"(b t)={batch_frames} rows is not a multiple of num_frames={num_frames}")
        batch = batch_frames // num_frames
        video = x.view(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)  # b c t h w
        h = self.norm(video)
        h = h.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, channels)  # (b h w) t c
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.view(batch, height, width, num_frames, channels).permute(0, 3, 4, 1, 2)  # b t c h w
        h = h.reshape(batch_frames, channels, height, width)  # (b t) c h w
        return h + x
