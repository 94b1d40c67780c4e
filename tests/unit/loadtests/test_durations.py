"""The load tests take the broker CLI's DURATION syntax (issue 15: `--duration 5s` was
refused) as well as plain seconds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtests.cli import build_parser
from loadtests.durations import seconds
from loadtests.scenarios import SCENARIOS


@pytest.mark.parametrize(
    ("text", "expected"), [("10", 10.0), ("0.5", 0.5), ("5s", 5.0), ("1m30s", 90.0), ("2m", 120.0)]
)
def test_seconds_accepts_numbers_and_cli_durations(text: str, expected: float) -> None:
    assert seconds(text) == expected


def test_seconds_refuses_what_is_no_duration() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        seconds("soon")


def test_the_run_command_parses_duration_and_warmup(tmp_path: Path) -> None:
    scenario = sorted(SCENARIOS)[0]
    args = build_parser().parse_args(
        ["run", "--scenario", scenario, "--report", str(tmp_path),
         "--duration", "5s", "--warmup", "1s"]
    )  # fmt: skip
    assert (args.duration, args.warmup) == (5.0, 1.0)
