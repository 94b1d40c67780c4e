"""Broker-generated passwords: drawn from the given random source, only from the alphabet,
without the modulo bias of the bytes at or above the largest multiple of its size."""

from __future__ import annotations

import itertools
import string

import pytest

from broker.passwords import generate_password, system_random


def test_only_the_alphabet_and_the_length_asked_for() -> None:
    alphabet = string.ascii_letters + string.digits
    for length in (1, 32, 4096):
        value = generate_password(system_random, length, alphabet)
        assert len(value) == length and set(value) <= set(alphabet)


def test_bytes_that_would_bias_are_skipped() -> None:
    # 62 characters: bytes 248..255 would favour the first 8; they must be dropped.
    stream = itertools.cycle([255, 248, 0, 61, 62, 247])

    def source(n: int) -> bytes:
        return bytes(next(stream) for _ in range(n))

    alphabet = string.ascii_letters + string.digits
    value = generate_password(source, 4, alphabet)
    assert value == alphabet[0] + alphabet[61] + alphabet[0] + alphabet[247 % 62]


def test_every_character_is_reachable_and_none_favoured() -> None:
    alphabet = "abcdefghij"  # 10: bytes 250..255 dropped
    counts = dict.fromkeys(alphabet, 0)
    every_byte = bytes(range(256))
    for ch in generate_password(lambda n: (every_byte * (n // 256 + 1))[:n], 250, alphabet):
        counts[ch] += 1
    assert set(counts.values()) == {25}


@pytest.mark.parametrize(("length", "alphabet"), [(0, "ab"), (4097, "ab"), (8, "a"), (8, "aab")])
def test_bad_requests_are_refused(length: int, alphabet: str) -> None:
    with pytest.raises(ValueError):
        generate_password(system_random, length, alphabet)
