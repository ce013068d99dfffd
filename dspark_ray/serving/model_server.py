"""The coordinator of one model instance: an async front for an engine loop, streaming deltas.

It is a plain class (a "shim" in Ray Serve LLM's words): `dspark_ray.serving.app` applies
`serve.deployment` to the class around it when the application is built. The engine is not
thread-safe, so every engine call happens in ONE `EngineLoop`, run by a runner: `LoopThread` on a
thread of this process (any engine object: tests, engines on worker actors), or `EngineProcess`
in a process of its own (the local engine, built there from its config). Requests and aborts
reach the loop as commands; deltas come back by ticket into asyncio queues. Deltas that queued up
while the stream's reader was busy leave as one (as vLLM's output collector merges them): a
loaded replica then sends fewer, larger pieces through Serve, the router and the proxy, which
spend their CPU per piece, not per token.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.serving.engine_loop import Command, EngineLoop, error_delta
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest


class EngineRunner(Protocol):
    context_limit: int  # prompt + completion tokens the engine takes

    def start(self, server: ModelServer) -> None:
        """Run the loop; its deltas go to `server.deliver`, and `server.fail_all` when it dies."""

    def submit(self, command: Command) -> None: ...

    @property
    def num_active(self) -> int: ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


class ModelServer:
    def __init__(self, runner: EngineRunner) -> None:
        self.runner = runner
        self._tickets = itertools.count()
        # by ticket: the request, and where its deltas go (the loop and queue of its generate call)
        self._open: dict[int, tuple[CompletionRequest, asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        runner.start(self)

    @classmethod
    def on_thread(cls, engine: SpeculativeEngine, decode: Callable[[list[int]], str]) -> ModelServer:
        return cls(LoopThread(engine, decode))

    @property
    def num_active(self) -> int:
        """Sequences holding engine state (waiting or running)."""
        return self.runner.num_active

    def is_alive(self) -> bool:
        return self.runner.is_alive()

    async def generate(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        ticket = next(self._tickets)
        deltas: asyncio.Queue = asyncio.Queue()
        self._open[ticket] = (request, asyncio.get_running_loop(), deltas)
        self.runner.submit(("add", ticket, request))
        try:
            while True:
                delta = await deltas.get()
                while delta.finish_reason is None and not deltas.empty():
                    delta = delta.followed_by(deltas.get_nowait())
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:  # finished, or the client went away: free the sequence either way
            del self._open[ticket]
            self.runner.submit(("abort", ticket, None))

    def deliver(self, ticket: int, delta: CompletionDelta) -> None:
        """Called on the runner's thread."""
        self.deliver_all([(ticket, delta)])

    def deliver_all(self, deltas: list[tuple[int, CompletionDelta]]) -> None:
        """Deltas by ticket, called on the runner's thread: one wake-up of each event loop they go to."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, CompletionDelta]]] = {}
        for ticket, delta in deltas:
            open_request = self._open.get(ticket)
            if open_request is not None:
                _, loop, stream_deltas = open_request
                by_loop.setdefault(loop, []).append((stream_deltas, delta))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def fail_all(self, message: str) -> None:
        """The loop is gone: end every open request with an error."""
        for ticket, (request, _, _) in list(self._open.items()):
            self.deliver(ticket, error_delta(request, message))

    def shutdown(self) -> None:
        self.runner.shutdown()


def _put_all(puts: list[tuple[asyncio.Queue, CompletionDelta]]) -> None:
    for deltas, delta in puts:
        deltas.put_nowait(delta)


class LoopThread:
    """Runs an `EngineLoop` on a thread of this process."""

    def __init__(self, engine: SpeculativeEngine, decode: Callable[[list[int]], str], owns_engine: bool = False
                 ) -> None:
        self.engine = engine
        self.decode = decode
        self.owns_engine = owns_engine  # shut the engine down with the loop (its worker actors, if any)
        self.context_limit = engine.stop_rules.context_limit
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()

    def start(self, server: ModelServer) -> None:
        self._loop = EngineLoop(self.engine, self.decode, server.deliver)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, command: Command) -> None:
        self._inbox.put(command)

    @property
    def num_active(self) -> int:
        return self._loop.num_active

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        engine_shutdown = getattr(self.engine, "shutdown", None)  # distributed: workers, placement group
        if self.owns_engine and engine_shutdown is not None:
            engine_shutdown()

    def _run(self) -> None:
        self._loop.run(self._receive, keep_going=lambda: not self._stopping.is_set())

    def _receive(self, timeout: float) -> Command | None:
        try:
            return self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return None
