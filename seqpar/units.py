"""Sizes and token counts: the one place they are defined, parsed and printed.

Token counts use binary multipliers, as sequence lengths do (k = 1024, m = 2^20,
g = 2^30): "128k" is 131072 tokens. A fractional count ("3.7m", "1.5k") is rounded to
the nearest whole token. Memory sizes: "80GiB" / "80G" are binary, "141GB" decimal.
"""

from __future__ import annotations

import re

from .errors import SeqparError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_TOKEN_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}
_BYTE_UNITS = {"": 1, "b": 1, "k": KIB, "kib": KIB, "kb": 1000, "m": MIB, "mib": MIB,
               "mb": 10 ** 6, "g": GIB, "gib": GIB, "gb": 10 ** 9, "t": TIB, "tib": TIB, "tb": 10 ** 12}


def parse_tokens(text, minimum: int = 2) -> int:
    """"4096" -> 4096, "32K" -> 32768, "1.5k" -> 1536, "3.7m" -> 3879731 (nearest token)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)\s*", str(text))
        if not m:
            raise SeqparError(f"cannot read token count {text!r}; write e.g. 4096, 4k, 1.5k, 32K or 3.7m "
                              "(k = 1024, m = 1024^2).")
        value = round(float(m.group(1)) * _TOKEN_UNITS[m.group(2).lower()])
    if value < minimum:
        raise SeqparError(f"token count {text!r} must be at least {minimum}.")
    return value


def parse_token_list(text) -> list[int]:
    """"1k,2k,4k" (or a list of such) -> [1024, 2048, 4096], ascending, without repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i for i in items if str(i).strip()]
    if not items:
        raise SeqparError("no lengths given; pass e.g. 1k,2k,4k.")
    return sorted({parse_tokens(i) for i in items})


def format_tokens(n: int) -> str:
    """1024 -> "1K", 3 << 20 -> "3M", 1000 -> "1000"."""
    for unit, size in (("M", MIB), ("K", KIB)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_bytes(text: str) -> int:
    """'80GiB', '80G', '141 GB', '2.5TiB' -> bytes (G = GiB, GB = 10^9)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise SeqparError(f"cannot read memory size {text!r}; write e.g. 80GiB, 80GB or 141G.")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])
