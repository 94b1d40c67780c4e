"""Durations on the load tests' command lines: the broker CLI's syntax (`5s`, `1m30s`, `500ms`,
see `ca.duration`) or a plain number of seconds (`10`, `0.5`), so `--duration 5s` works here as
it does for `broker`."""

from __future__ import annotations

import argparse

from ca.duration import parse_duration
from ca.errors import InvalidTTL

__all__ = ["seconds"]


def seconds(text: str) -> float:
    """argparse `type=`: the duration `text` in seconds (float)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text).total_seconds()
    except InvalidTTL as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 10, 5s, 1m30s): {exc}"
        ) from None
