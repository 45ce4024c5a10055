"""Server-side checks of every request field, with messages that name the field and the allowed range.

The UI's sliders are no defence: API callers can send anything JSON can carry (strings, lists, null, and
NaN/Infinity, which Python's JSON parser accepts). Every check here returns a clean value or raises
`InputError`; nothing is clamped silently.
"""
from __future__ import annotations

import math
import numbers
import unicodedata
from typing import Callable

SEED_MAX = 2**32 - 1          # torch/numpy seeds are 32-bit in most front-ends people reproduce runs with
PROMPT_MAX_CHARS = 4000       # far above 77 tokens; bounds tokenizer work on hostile input
PROMPT_TOKENS = 77            # open_clip context length, start and end markers included


class UserFacingError(Exception):
    """An error whose message is written for the person who sent the request, shown as it is."""


class InputError(UserFacingError, ValueError):
    """A request field is missing, of the wrong type or outside its range; the message names the field."""


def _describe(value) -> str:
    """How a rejected value is shown in a message: short, and its type when the type is the problem."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{value} (true/false)"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:20] + "..."
        return f"{shown!r} (text)"
    if isinstance(value, numbers.Integral) and abs(value) > _LARGEST_SHOWN:
        return _huge(value)
    if isinstance(value, numbers.Real):
        return _fmt(float(value))
    return f"a {type(value).__name__}"


# JSON integers have no size limit, and float() of one past ~1e308 raises OverflowError. Far below that, any
# integer is out of every field's range; it is shown by its length, not converted.
_LARGEST_SHOWN = 10**18


def _huge(value: int) -> str:
    return f"a {len(str(abs(int(value))))}-digit number"


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    # Whole numbers in full (a seed shown as 4.29497e+09 would hide which one was sent).
    return str(int(x)) if x == int(x) and abs(x) < 1e18 else repr(x)


def _real_number(field: str, value, expected: str) -> float:
    # bool is an int subclass in Python; `true` for steps is a caller's mistake, not 1 step.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{field}: expected {expected}, got {_describe(value)}")
    if isinstance(value, numbers.Integral) and abs(value) > _LARGEST_SHOWN:
        raise InputError(f"{field}: expected {expected}, got {_huge(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise InputError(f"{field}: expected {expected}, got {_fmt(x)}")
    return x


def whole_number(field: str, value, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; 7.0 is accepted as 7 (JSON and sliders send floats), 7.5 is not."""
    expected = f"a whole number from {lo} to {hi}"
    x = _real_number(field, value, expected)
    if x != int(x) or not lo <= x <= hi:
        raise InputError(f"{field}: expected {expected}, got {_fmt(x)}")
    return int(x)


def real_number(field: str, value, lo: float, hi: float) -> float:
    """A finite number in [lo, hi]."""
    expected = f"a number from {lo:g} to {hi:g}"
    x = _real_number(field, value, expected)
    if not lo <= x <= hi:
        raise InputError(f"{field}: expected {expected}, got {_fmt(x)}")
    return x


def seed_value(value) -> int:
    """-1 (pick one at random) or a whole number in 0..2^32-1."""
    expected = f"-1 (random) or a whole number from 0 to {SEED_MAX}"
    x = _real_number("seed", value, expected)
    if x != int(x) or not (x == -1 or 0 <= x <= SEED_MAX):
        raise InputError(f"seed: expected {expected}, got {_fmt(x)}")
    return int(x)


def choice(field: str, value, allowed) -> str:
    """One of a fixed set of names (exact match: 'Fixed' is not 'fixed')."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{field}: expected one of {', '.join(allowed)}, got {_describe(value)}")
    return value


def flag(field: str, value) -> bool:
    """A true/false switch; None means 'not given' and is handled by the caller."""
    if not isinstance(value, bool):
        raise InputError(f"{field}: expected true or false, got {_describe(value)}")
    return value


# Unicode categories removed from prompts: controls (Cc), invisible format characters such as bidi overrides
# and zero-width joiners (Cf), lone surrogates (Cs), private-use (Co) and unassigned code points (Cn). None of
# them carries meaning for the text encoder; some of them make a prompt display differently from what it is.
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
_SPACES = "\t\r\n\v\f"


def clean_prompt(value, num_tokens: Callable[[str], int] | None = None,
                 context_length: int = PROMPT_TOKENS) -> tuple[str, list[str]]:
    """-> (prompt the model gets, notices for the report). Empty is fine: the model then runs unconditionally.

    `num_tokens(text)` is the text encoder's own count (start and end markers included); without it the
    length notice is skipped.
    """
    if value is None:
        return "", []
    if not isinstance(value, str):
        raise InputError(f"prompt: expected text of at most {PROMPT_MAX_CHARS} characters, got {_describe(value)}")
    if len(value) > PROMPT_MAX_CHARS:
        raise InputError(f"prompt: expected text of at most {PROMPT_MAX_CHARS} characters, got {len(value)}")
    notices = []
    text = unicodedata.normalize("NFC", value)
    # Line breaks and tabs become spaces (they are controls too, but they separate words).
    kept = [" " if ch in _SPACES else ch for ch in text
            if ch in _SPACES or unicodedata.category(ch) not in _DROP_CATEGORIES]
    cleaned = " ".join("".join(kept).split())
    if cleaned != " ".join(text.split()):
        notices.append("prompt: control or invisible characters were removed")
    if num_tokens is not None and cleaned:
        tokens = num_tokens(cleaned)
        if tokens > context_length:
            notices.append(
                f"prompt: {tokens} tokens is longer than the text encoder's {context_length}; the end was cut off"
            )
    return cleaned, notices
