"""The failures of upstream's DDIM sampler that the stock sampler reproduces on purpose.

The app's compare view exists to show them, so the service reports exactly these as "stock: crashed" and
lets every other exception surface as the bug it is. Each class also derives from the exception type upstream
raises at that place, so code written against upstream's behaviour (`except IndexError`) still catches it.
"""
from __future__ import annotations


class StockSamplerFailure(Exception):
    """Upstream's sampler fails here, the same way and for the same reason (see docs/nan-fix.md)."""


class StockIndexError(StockSamplerFailure, IndexError):
    """"uniform" spacing reaches timestep N (S = 3, 9, 27, 36, 37, every S >= 501)."""


class StockTypeError(StockSamplerFailure, TypeError):
    """bfloat16 schedule buffers: upstream converts them to numpy, which has no bfloat16."""


class StockRuntimeError(StockSamplerFailure, RuntimeError):
    """"uniform_trailing" reaches timestep -1 (S = 61, 103, ...); a v model's conversion cannot gather it."""
