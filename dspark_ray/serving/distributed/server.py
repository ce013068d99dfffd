"""The gRPC side of a worker actor: a server on a free port of its node address, for callers with the
deployment's credential, one command at a time, busy/idle clock.

A worker serves its commands strictly one after another (the coordinator never overlaps two
commands to one worker, and the lock makes sure of it). Between commands a worker may run
background work (the draft worker's look-ahead) that yields as soon as a command arrives.
`CommandClock` measures the time spent executing commands and background work, and the time spent
waiting: the idle time the pipelined coordinator and the look-ahead exist to drive down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import contextmanager

import grpc

from dspark_ray.serving.distributed.credential import RequireSecret
from dspark_ray.serving.distributed.mirror import SequenceStateError

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class CommandClock:
    def __init__(self) -> None:
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.num_commands = 0
        self._last_end: float | None = None  # None: the next wait is not counted
        self._lock = threading.Lock()

    @contextmanager
    def command(self, counted: bool = True):
        """Time one command (`counted`) or a piece of background work (busy, not a command)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            with self._lock:
                if self._last_end is not None:
                    self.idle_s += start - self._last_end
                self.busy_s += end - start
                self.num_commands += counted
                self._last_end = end

    def reset(self) -> None:
        with self._lock:
            self.busy_s = self.idle_s = 0.0
            self._last_end = None


class CommandRunner:
    """Runs one command at a time under the clock and turns failures into gRPC status codes."""

    def __init__(self) -> None:
        self.clock = CommandClock()
        self._lock = threading.Lock()
        self._num_waiting = 0  # commands waiting for the lock: background work yields to them
        self._waiting_lock = threading.Lock()
        self._num_finished = 0  # commands run so far: background work is for the state one left
        self._background = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="between-commands")

    def run(self, context: grpc.ServicerContext, command: Callable, *args):
        self._count_waiting(+1)
        with self._lock:
            self._count_waiting(-1)
            try:
                with self.clock.command():
                    return command(*args)
            except SequenceStateError as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
            except Exception as error:  # noqa: BLE001 - reported to the coordinator, which decides
                context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
            finally:
                self._num_finished += 1

    def run_after_this_command(self, work: Callable[[Callable[[], bool]], None]) -> None:
        """From inside a command: run `work(should_stop)` once it has finished, unless another
        command comes first. `should_stop()` turns true as soon as a command is waiting, and work
        must then return promptly (it holds the command lock)."""
        state = self._num_finished + 1  # the count once the calling command has finished
        self._background.submit(self._run_background, work, state)

    def _run_background(self, work: Callable[[Callable[[], bool]], None], state: int) -> None:
        with self._lock:
            if self._num_finished != state or self._num_waiting:
                return
            try:
                with self.clock.command(counted=False):
                    work(lambda: self._num_waiting > 0)
            except Exception:  # noqa: BLE001 - background work is optional; the next command re-syncs
                logger.exception("background work between commands failed")

    def _count_waiting(self, change: int) -> None:
        with self._waiting_lock:
            self._num_waiting += change


def start_server(add_servicer: Callable, servicer, host: str, secret: str) -> tuple[grpc.Server, str]:
    """Serve on a free port of `host` (the node address Ray uses: never every interface), only to
    calls that carry `secret`; returns the server and the address clients dial."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[RequireSecret(secret)],
                         options=GRPC_OPTIONS)
    add_servicer(servicer, server)
    address = f"[{host}]" if ":" in host else host
    port = server.add_insecure_port(f"{address}:0")
    server.start()
    return server, f"{address}:{port}"
