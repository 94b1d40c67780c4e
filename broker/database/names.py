"""The one naming rule for connections, roles and the owner, tenant and environment of a role:
lowercase, short, safe to put in a lease id and a log line."""

from __future__ import annotations

import re
from typing import Final

from broker.errors import InvalidArgument

__all__ = ["check_name"]

_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(name: str, what: str) -> str:
    """`name` itself when it follows the rule; InvalidArgument naming `what` otherwise."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name
