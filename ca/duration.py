"""Human durations for TTLs and config: "30s", "15m", "1h", "2h30m", "1d", "500ms".

The grammar is deliberately small: one or more `<integer><unit>` parts, units `d`, `h`, `m`,
`s`, `ms`, each unit at most once and largest first. No signs, no fractions, no spaces inside.
Parsing only checks the form and range (0 .. 100 years); whether a TTL is acceptable is CA policy's
call (`ca.policy`). `format_duration` is the inverse: `parse_duration(format_duration(d)) == d`
for whole milliseconds.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

from ca.errors import InvalidTTL

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

MAX_DURATION: Final = dt.timedelta(days=36500)

_ACCEPTED: Final = (
    "expected a duration like '30s', '15m', '1h', '2h30m', '1d' or '500ms' "
    "(whole numbers with units d, h, m, s, ms; largest unit first)"
)
_UNITS: Final = {
    "d": dt.timedelta(days=1),
    "h": dt.timedelta(hours=1),
    "m": dt.timedelta(minutes=1),
    "s": dt.timedelta(seconds=1),
    "ms": dt.timedelta(milliseconds=1),
}
_ORDER: Final = ("d", "h", "m", "s", "ms")
# `ms` must be tried before `m`. [0-9] rather than \d: \d also matches non-ASCII digits.
_PART: Final = re.compile(r"([0-9]+)(ms|d|h|m|s)")
_ECHO_LIMIT: Final = 40


def _echo(text: str) -> str:
    return repr(text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "...")


def parse_duration(text: str) -> dt.timedelta:
    """Parse `text` into a timedelta; raise `InvalidTTL` naming the input and the accepted form.

    Zero ("0s") parses to `timedelta(0)`: rejecting zero TTLs is policy's job, not the parser's.
    """
    if not isinstance(text, str):
        raise InvalidTTL(f"duration must be a string, not {type(text).__name__}; {_ACCEPTED}")
    stripped = text.strip()
    if not stripped:
        raise InvalidTTL(f"duration is empty; {_ACCEPTED}")
    if stripped[0] in "-+":
        what = "negative" if stripped[0] == "-" else "signed"
        raise InvalidTTL(f"duration {_echo(text)} is {what}; {_ACCEPTED}")
    total = dt.timedelta(0)
    position = 0
    last_rank = -1
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise InvalidTTL(f"duration {_echo(text)} is not understood; {_ACCEPTED}")
        unit = match.group(2)
        rank = _ORDER.index(unit)
        if rank <= last_rank:
            raise InvalidTTL(
                f"duration {_echo(text)} repeats a unit or puts a smaller unit before a larger "
                f"one; {_ACCEPTED}"
            )
        last_rank = rank
        digits = match.group(1)
        # Check each part before converting and multiplying: int() refuses over 4300 digits and
        # timedelta itself overflows near 2.7 million years.
        if len(digits) > 15 or int(digits) > MAX_DURATION // _UNITS[unit]:
            raise InvalidTTL(f"duration {_echo(text)} is longer than the maximum of 100 years")
        total += int(digits) * _UNITS[unit]
        position = match.end()
    if total > MAX_DURATION:
        raise InvalidTTL(f"duration {_echo(text)} is longer than the maximum of 100 years")
    return total


def format_duration(value: dt.timedelta) -> str:
    """Format as the compact form parse_duration reads, e.g. "1h30m", "45s", "0s".

    Hours are not folded into days so that TTLs read naturally ("24h", "48h"). Sub-millisecond
    remainders are dropped. Negative values get a leading "-" (for messages only: the parser
    refuses them).
    """
    if value < dt.timedelta(0):
        return "-" + format_duration(-value)
    milliseconds = value // dt.timedelta(milliseconds=1)
    if milliseconds == 0:
        return "0s"
    seconds, ms = divmod(milliseconds, 1000)
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    parts = [(hours, "h"), (m, "m"), (s, "s"), (ms, "ms")]
    return "".join(f"{amount}{unit}" for amount, unit in parts if amount)
