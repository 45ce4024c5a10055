"""How many tokens a transformer block works on at once: the low-memory path of the UNet's transformers.

Every sub-layer of a transformer block treats its sequences independently (attention mixes tokens within one
sequence, the feed-forward is per token), so a block can run over a few sequences at a time, and its
feed-forward over a few tokens at a time, with the same result up to float rounding. That bounds the
temporaries that otherwise scale with all tokens at once: the peak of a 512-model forward is the GEGLU of
the temporal transformer after the first conv (`init_attn`), 16 frames x 40 x 64 = 40,960 tokens through a
projection 8x the block's width (4,096), about 640 MB in float32 per sample.

A chunk is given as a number of tokens, or as a budget in bytes for the feed-forward's temporaries of one
chunk (converted per block from its width and dtype). This module imports no torch: the options parse it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Live elements per token inside the GEGLU feed-forward at its peak, in units of the block's width d:
# the projection's output (8d: value and gate, 4d each), GELU(gate) (4d) and value * GELU(gate) (4d).
FEED_FORWARD_ELEMENTS_PER_WIDTH = 16

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TokenChunking:
    """Either `tokens` (tokens per chunk) or `budget_bytes` (bytes of feed-forward temporaries per chunk)."""

    tokens: int | None = None
    budget_bytes: int | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.budget_bytes is None):
            raise ValueError("a token chunk is either a number of tokens or a budget in bytes, not both or none")
        value = self.tokens if self.tokens is not None else self.budget_bytes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"a token chunk must be a whole number, 1 or more, got {value!r}")

    def tokens_for(self, width: int, element_size: int) -> int:
        """Tokens per chunk for a block of `width` channels whose activations have `element_size` bytes."""
        if self.tokens is not None:
            return self.tokens
        per_token = FEED_FORWARD_ELEMENTS_PER_WIDTH * width * element_size
        return max(1, self.budget_bytes // per_token)

    def __str__(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens} tokens"
        return f"{self.budget_bytes / 2**20:g} MiB budget"


def parse_token_chunking(value) -> TokenChunking:
    """'4096' -> 4096 tokens; '64MiB', '0.5GB', '200MB' -> a budget in bytes. Raises ValueError saying what is
    allowed."""
    if isinstance(value, TokenChunking):
        return value
    text = str(value).strip()
    if text.isdigit() and int(text) >= 1:
        return TokenChunking(tokens=int(text))
    match = _SIZE.match(text)
    if match:
        budget = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        if budget >= 1:
            return TokenChunking(budget_bytes=budget)
    raise ValueError(f"expected a number of tokens (e.g. 4096) or a memory budget (e.g. 64MiB, 0.5GB), got {value!r}")
