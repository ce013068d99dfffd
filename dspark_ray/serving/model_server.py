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

The server remembers what each open request's client has been sent. When an `EngineProcess`
dies, it starts a new one and replays every unfinished request as the continuation of that
(`CompletionRequest.resumed`): the stream goes on where it was, with the text the lost engine
would have sent, seeded sampled text included (`engine.sequence` says why and when not). A request replayed
`MAX_REPLAYS` times fails alone; `MAX_RESTARTS_IN_A_ROW` restarts without a delta between them
fail every open request and leave the server down (`is_alive` false), for the replica to be replaced.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.serving.engine_loop import Command, EngineLoop, error_delta
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest

logger = logging.getLogger(__name__)

MAX_RESTARTS_IN_A_ROW = 3
MAX_REPLAYS = 3  # of one request: one that kills every engine it meets fails alone


class EngineRunner(Protocol):
    context_limit: int  # prompt + completion tokens the engine takes

    def start(self, server: ModelServer) -> None:
        """Run the loop; its deltas go to `server.deliver_all`, and `server.recover` when it dies."""

    def restart(self) -> None:
        """Start the loop again after it died (called from `server.recover`); raises if it cannot."""

    def submit(self, command: Command) -> None: ...

    @property
    def num_active(self) -> int: ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


@dataclass
class _OpenRequest:
    """A request being generated: where its deltas go, and what its client has been sent."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop  # of its generate call
    deltas: asyncio.Queue
    sent_token_ids: list[int] = field(default_factory=list)
    num_chars_sent: int = 0
    finished: bool = False
    num_replays: int = 0

    def record(self, delta: CompletionDelta) -> None:
        self.sent_token_ids.extend(delta.token_ids)
        self.num_chars_sent += len(delta.text)
        self.finished = delta.finish_reason is not None

    def continuation(self) -> CompletionRequest:
        return self.request.resumed(self.sent_token_ids, self.num_chars_sent)


class ModelServer:
    def __init__(self, runner: EngineRunner) -> None:
        self.runner = runner
        self.num_restarts = 0
        self._tickets = itertools.count()
        self._open: dict[int, _OpenRequest] = {}  # by ticket
        self._lock = threading.Lock()  # orders adds and aborts against a replay
        self._recovering = False  # the runner is being restarted: its replay will add what opens now
        self._failure: str | None = None  # the runner is down for good
        self._restarts_in_a_row = 0
        self._last_progress = time.monotonic()  # the last delta, or when work arrived at an idle server
        runner.start(self)

    @classmethod
    def on_thread(cls, engine: SpeculativeEngine, decode: Callable[[list[int]], str]) -> ModelServer:
        return cls(LoopThread(engine, decode))

    @property
    def num_active(self) -> int:
        """Sequences holding engine state (waiting or running)."""
        return self.runner.num_active

    def is_alive(self) -> bool:
        return self._failure is None and (self._recovering or self.runner.is_alive())

    def stalled_s(self) -> float:
        """Seconds without a delta while requests wait for one; 0 when none does (idle is no stall)."""
        return time.monotonic() - self._last_progress if self._has_pending() else 0.0

    async def generate(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        ticket = next(self._tickets)
        deltas: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if not self._has_pending():
                self._last_progress = time.monotonic()
            self._open[ticket] = _OpenRequest(request, asyncio.get_running_loop(), deltas)
            failure = self._failure
            if failure is None and not self._recovering:
                self.runner.submit(("add", ticket, request))
        if failure is not None:
            deltas.put_nowait(error_delta(request, failure))
        try:
            while True:
                delta = await deltas.get()
                while delta.finish_reason is None and not deltas.empty():
                    delta = delta.followed_by(deltas.get_nowait())
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:  # finished, or the client went away: free the sequence either way
            with self._lock:
                del self._open[ticket]
                if self._failure is None and not self._recovering:
                    self.runner.submit(("abort", ticket, None))

    def deliver(self, ticket: int, delta: CompletionDelta) -> None:
        """Called on the runner's thread."""
        self.deliver_all([(ticket, delta)])

    def deliver_all(self, deltas: list[tuple[int, CompletionDelta]]) -> None:
        """Deltas by ticket, called on the runner's thread: one wake-up of each event loop they go to."""
        self._last_progress = time.monotonic()
        self._restarts_in_a_row = 0
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, CompletionDelta]]] = {}
        for ticket, delta in deltas:
            open_request = self._open.get(ticket)
            if open_request is not None:
                open_request.record(delta)
                by_loop.setdefault(open_request.loop, []).append((open_request.deltas, delta))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def fail_all(self, message: str) -> None:
        """The loop is gone: end every unfinished open request with an error."""
        self.deliver_all([(ticket, self._failed(open_request, message))
                          for ticket, open_request in list(self._open.items()) if not open_request.finished])

    def recover(self, message: str) -> None:
        """The runner died (`message` says how), on its thread: start it again and replay every
        unfinished request; when restarts keep failing, fail them all and stay down."""
        with self._lock:
            self._recovering = True
        cause = message
        while self._restarts_in_a_row < MAX_RESTARTS_IN_A_ROW:
            self._restarts_in_a_row += 1
            try:
                self.runner.restart()
            except Exception as error:  # noqa: BLE001 - counted; clients see the last line of the last one
                logger.warning("restarting the engine failed: %s", error)
                last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                message = f"{cause}; restarting it failed: {last_line}"
                continue
            self._replay()
            return
        with self._lock:
            self._failure = f"{message} ({MAX_RESTARTS_IN_A_ROW} restarts in a row without progress)"
            self._recovering = False
        self.fail_all(self._failure)

    def _replay(self) -> None:
        """Add every unfinished open request to the restarted runner, continuing where its client is."""
        failed = []
        with self._lock:
            self.num_restarts += 1
            self._recovering = False
            self._last_progress = time.monotonic()
            for ticket, open_request in self._open.items():
                if open_request.finished:
                    continue
                open_request.num_replays += 1
                if open_request.num_replays > MAX_REPLAYS:
                    failed.append((ticket, self._failed(open_request, f"the engine died {MAX_REPLAYS + 1} times "
                                                                      "while it generated this request")))
                else:
                    self.runner.submit(("add", ticket, open_request.continuation()))
        self.deliver_all(failed)

    def _has_pending(self) -> bool:
        return any(not open_request.finished for open_request in list(self._open.values()))

    @staticmethod
    def _failed(open_request: _OpenRequest, message: str) -> CompletionDelta:
        return error_delta(open_request.request, message, len(open_request.sent_token_ids))

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

    def restart(self) -> None:
        raise RuntimeError("an engine loop thread is not restarted")  # it never calls server.recover

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
