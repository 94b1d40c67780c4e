"""The daemon raises its fd soft limit to the hard limit at start, saying so (finding 10)."""

import logging
import resource

import pytest

from broker.daemon import raise_fd_limit


def test_soft_limit_is_raised_to_the_hard_limit_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256) if hard == resource.RLIM_INFINITY else min(soft, hard, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with caplog.at_level(logging.INFO, logger="broker"):
            before, after = raise_fd_limit()
        assert before == lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard) == (after, hard)
        assert any("file descriptor limit raised" in r.getMessage() for r in caplog.records)
        with caplog.at_level(logging.INFO, logger="broker"):
            assert raise_fd_limit() == (hard, hard)  # already there: says so, changes nothing
        assert any("already the hard limit" in r.getMessage() for r in caplog.records)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
