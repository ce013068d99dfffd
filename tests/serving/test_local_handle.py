"""`LocalHandle`: the colocated router's in-process stand-in for a Serve DeploymentHandle."""

from __future__ import annotations

import asyncio

import pytest

from dspark_ray.serving.local_handle import LocalHandle


class Model:
    def __init__(self) -> None:
        self.closed: list[str] = []

    async def generate(self, name: str, count: int):
        try:
            for index in range(count):
                await asyncio.sleep(0)
                yield f"{name}{index}"
        finally:
            self.closed.append(name)

    def model_info(self) -> str:
        return "info"

    async def ping(self, value: int) -> int:
        return value + 1


def test_unary_calls_resolve_sync_and_async_methods() -> None:
    handle = LocalHandle(Model())

    async def calls():
        return await handle.model_info.remote(), await handle.ping.remote(41)

    assert asyncio.run(calls()) == ("info", 42)


def test_a_stream_yields_every_item_then_stops() -> None:
    model = Model()
    stream = LocalHandle(model).options(stream=True).generate.remote("a", 3)

    async def drain():
        return [item async for item in stream]

    assert asyncio.run(drain()) == ["a0", "a1", "a2"]
    assert model.closed == ["a"]


def test_cancel_closes_the_generator_and_runs_its_cleanup() -> None:
    model = Model()

    async def cut_short():
        stream = LocalHandle(model).options(stream=True).generate.remote("b", 100)
        first = await stream.__anext__()
        stream.cancel()
        stream.cancel()  # a second cancel is harmless
        await asyncio.sleep(0.01)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return first

    assert asyncio.run(cut_short()) == "b0"
    assert model.closed == ["b"]


def test_private_names_are_not_forwarded() -> None:
    with pytest.raises(AttributeError):
        LocalHandle(Model())._secret  # noqa: B018
