import datetime as dt

import pytest

from ca.duration import MAX_DURATION, format_duration, parse_duration
from ca.errors import InvalidInput, InvalidTTL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", dt.timedelta(seconds=30)),
        ("15m", dt.timedelta(minutes=15)),
        ("1h", dt.timedelta(hours=1)),
        ("2h30m", dt.timedelta(hours=2, minutes=30)),
        ("1h30m15s", dt.timedelta(hours=1, minutes=30, seconds=15)),
        ("1d", dt.timedelta(days=1)),
        ("1d12h", dt.timedelta(days=1, hours=12)),
        ("500ms", dt.timedelta(milliseconds=500)),
        ("1s500ms", dt.timedelta(seconds=1, milliseconds=500)),
        ("0s", dt.timedelta(0)),
        ("90m", dt.timedelta(minutes=90)),
        (" 5m ", dt.timedelta(minutes=5)),
        ("36500d", MAX_DURATION),
    ],
)
def test_parse(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("-1h", "is negative"),
        ("+1h", "is signed"),
        ("1.5h", "is not understood"),
        ("30", "is not understood"),
        ("h", "is not understood"),
        ("1 h", "is not understood"),
        ("1H", "is not understood"),
        ("1w", "is not understood"),
        ("1h garbage", "is not understood"),
        ("٣s", "is not understood"),  # a non-ASCII digit
        ("30m2h", "largest unit first"),
        ("1h1h", "repeats a unit"),
        ("36501d", "maximum of 100 years"),
        ("99999999999999999999s", "maximum of 100 years"),
        ("9" * 5000 + "s", "maximum of 100 years"),
    ],
)
def test_parse_refusals_name_input_and_form(text: str, fragment: str) -> None:
    with pytest.raises(InvalidTTL) as info:
        parse_duration(text)
    message = str(info.value)
    assert fragment in message
    assert len(message) < 300
    if "understood" in message:
        assert "'2h30m'" in message  # the accepted form is spelled out
        assert repr(text[:40]) in message or text[:40] in message


def test_invalid_ttl_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        parse_duration("soon")


def test_non_string_refused() -> None:
    with pytest.raises(InvalidTTL, match="must be a string"):
        parse_duration(3600)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (dt.timedelta(0), "0s"),
        (dt.timedelta(hours=1, minutes=30), "1h30m"),
        (dt.timedelta(hours=24), "24h"),
        (dt.timedelta(days=2, seconds=5), "48h5s"),
        (dt.timedelta(milliseconds=1500), "1s500ms"),
        (dt.timedelta(minutes=-5), "-5m"),
    ],
)
def test_format(value: dt.timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize(
    "value",
    [
        dt.timedelta(seconds=1),
        dt.timedelta(hours=26, minutes=3, seconds=4, milliseconds=5),
        dt.timedelta(days=400),
        MAX_DURATION,
    ],
)
def test_round_trip(value: dt.timedelta) -> None:
    assert parse_duration(format_duration(value)) == value
