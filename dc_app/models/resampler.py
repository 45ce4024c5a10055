"""The image-projection Resampler: CLIP image tokens -> a fixed number of context tokens for the UNet.

A Perceiver-style stack (as in IP-Adapter): a learned set of latent queries repeatedly cross-attends to the
projected image tokens (and to themselves), then is projected to the UNet's context width. DynamiCrafter
learns `num_queries` latents per frame, so the output has num_queries * video_length tokens, frame-major.
Module and parameter names mirror upstream's `image_proj_model.*` keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dc_app.models.attention_kernel import dot_product_attention


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, biases off; a Sequential so the keys read .0, .1, .3."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to cat(image tokens, latents); returns the update for the latents (no residual here)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads  # may differ from dim (768 vs 1024 in the real model)
        self.norm1 = nn.LayerNorm(dim)  # for the image tokens
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, length, _ = t.shape
        # (b, length, heads*d) -> (b, length, heads, d) -> (b, heads, length, d)
        return t.reshape(b, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        tokens, queries = self.norm1(x), self.norm2(latents)
        # The latents are the queries; keys and values come from the image tokens and the latents together,
        # so every latent also attends to the other latents.
        context = torch.cat([tokens, queries], dim=1)                   # (b, n_tokens + n_latents, dim)
        keys, values = self.to_kv(context).chunk(2, dim=-1)             # (b, n_tokens + n_latents, inner) each
        q, k, v = (self.split_heads(t) for t in (self.to_q(queries), keys, values))
        # Upstream scales q and k by d^-1/4 each before their product (keeps fp16 logits small) and takes the
        # softmax in float32. Scaling here and passing scale=1 gives the kernel exactly that computation; the
        # kernel's math path already takes its softmax in float32.
        quarter = self.dim_head ** -0.25
        mixed = dot_product_attention(q * quarter, k * quarter, v, scale=1.0)  # (b, heads, n_latents, d)
        batch, n_latents = queries.shape[:2]
        return self.to_out(mixed.transpose(1, 2).reshape(batch, n_latents, self.heads * self.dim_head))


class Resampler(nn.Module):
    """(B, N_img, embedding_dim) image tokens -> (B, num_queries * video_length, output_dim) context tokens.

    Args (upstream `image_proj_stage_config.params`): `dim` width of the latents, `depth` number of
    attention + feed-forward layers, `dim_head`/`heads` of the attention, `num_queries` latents per frame,
    `embedding_dim` width of the CLIP tokens, `output_dim` context width, `ff_mult` feed-forward expansion,
    `video_length` frames (None: a single set of `num_queries` latents).
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 8,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        embedding_dim: int = 768,
        output_dim: int = 1024,
        ff_mult: int = 4,
        video_length: int | None = None,
    ):
        super().__init__()
        for name, value in dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_queries=num_queries,
                                embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult).items():
            if int(value) <= 0:
                raise ValueError(f"Resampler {name}={value!r}: expected a positive integer")
        if video_length is not None and int(video_length) <= 0:
            raise ValueError(f"Resampler video_length={video_length!r}: expected a positive integer or None")
        self.num_queries = int(num_queries)
        self.video_length = int(video_length) if video_length is not None else None
        n_latents = self.num_queries * (self.video_length or 1)
        self.embedding_dim = int(embedding_dim)
        # Random init only matters without a checkpoint; the scale follows upstream (dim^-1/2).
        self.latents = nn.Parameter(torch.randn(1, n_latents, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.embedding_dim:
            raise ValueError(f"Resampler: expected image tokens (B, N, {self.embedding_dim}), got {tuple(x.shape)}")
        latents = self.latents.expand(x.shape[0], -1, -1)  # (1, n_latents, dim) -> (B, n_latents, dim)
        x = self.proj_in(x)  # (B, N, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, n_latents, output_dim)
