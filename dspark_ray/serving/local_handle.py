"""A DeploymentHandle look-alike over an object in this process.

The colocated router (`AppConfig.colocate_router`) calls its `ServedModel` through this instead of
a Serve handle: the same `.options(stream=True).method.remote(...)` calls, the same streams with
`__anext__` and `cancel()`, but no hop between replicas. Only what `Router` uses is offered.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any


class LocalHandle:
    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target = target
        self._stream = stream

    def options(self, stream: bool = False) -> LocalHandle:
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self._target, name), self._stream)


class _LocalMethod:
    def __init__(self, method, stream: bool) -> None:
        self._method = method
        self._stream = stream

    def remote(self, *args, **kwargs):
        if self._stream:
            return LocalStream(self._method(*args, **kwargs))
        return _call(self._method, args, kwargs)


async def _call(method, args, kwargs):
    result = method(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


class LocalStream:
    """An async generator with a Serve stream's `cancel()`: close it, which runs its cleanup."""

    def __init__(self, generator: AsyncIterator) -> None:
        self._generator = generator
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> LocalStream:
        return self

    def __anext__(self):
        return self._generator.__anext__()

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._generator.aclose())
