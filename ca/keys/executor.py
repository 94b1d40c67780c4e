"""Token calls off the event loop.

A key backend that talks to a token owns an `executor` (`Pkcs11Backend.executor`: one thread
per pooled session); `token_call` runs a blocking backend call there and awaits it, so the
event loop keeps serving requests that need no token (health, bundle, cached refusals) while
the token works. A backend without an executor (the software backend: microseconds of work in
process memory) is called inline: a thread hop would cost more than the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["backend_executor", "token_call"]

T = TypeVar("T")


def backend_executor(keys: Any) -> concurrent.futures.Executor | None:
    """The backend's executor, or None when its calls are cheap enough to run inline."""
    executor = getattr(keys, "executor", None)
    return executor if isinstance(executor, concurrent.futures.Executor) else None


async def token_call(keys: Any, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `keys`' executor (inline when it has none); exceptions propagate."""
    executor = backend_executor(keys)
    if executor is None:
        return fn(*args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args))
