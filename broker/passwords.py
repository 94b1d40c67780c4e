"""Broker-generated passwords and secret values, drawn from the key backend's random generator
(`ca.keys.random_source`: C_GenerateRandom on PKCS#11, os.urandom for the software backend).

`RandomBytes` is what the domain takes (a `RandomSource.random`); `generate_password` maps its
bytes onto an alphabet without bias (rejection sampling).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

__all__ = ["RandomBytes", "generate_password", "system_random"]

RandomBytes = Callable[[int], bytes]
_MAX_LENGTH: Final = 4096


def system_random(n: int) -> bytes:
    """The operating system's generator: for tests and tools without a key backend."""
    return os.urandom(n)


def generate_password(random: RandomBytes, length: int, alphabet: str) -> str:
    """`length` characters drawn uniformly from `alphabet` (2..256 distinct characters) with
    bytes from `random`."""
    if not 1 <= length <= _MAX_LENGTH:
        raise ValueError(f"password length must be 1..{_MAX_LENGTH}")
    size = len(alphabet)
    if not 2 <= size <= 256 or len(set(alphabet)) != size:
        raise ValueError("the alphabet must have 2..256 distinct characters")
    limit = 256 - 256 % size  # bytes at or above it would favour the first characters
    out: list[str] = []
    while len(out) < length:
        for byte in random(min(4096, 2 * (length - len(out)) + 8)):
            if byte < limit:
                out.append(alphabet[byte % size])
                if len(out) == length:
                    break
    return "".join(out)
