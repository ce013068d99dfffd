"""The local engine in a process of its own, the way vLLM runs its engine core.

A step of a small target on a CPU is mostly Python (many small ops, the MoE experts looped), and
every torch op hands the GIL back and forth. Stepped on a thread of the model-server replica, the
engine shared its GIL with the replica's event loop, which handles each delta a step emits (Ray
Serve's streaming, serialization, gRPC), so on a machine with a spare core a step still ran
slower than in a plain process. In a child process the engine's Python runs under a GIL of its
own; the replica only forwards commands and deltas (`docs/benchmarks/serving-log.md` has the
served c=1 figures with and without it).

The child is started with `python -m dspark_ray.serving.engine_process` (not multiprocessing's
spawn, which would re-import the Ray worker's main module) and talks over two pipes:
- commands in: first `(EngineConfig, torch threads, CPU ids or None)`, then `EngineLoop` commands;
- events out: `("ready", context_limit)` or `("failed", traceback)` once, then
  `("deltas", [(ticket, delta), ...])`, one message for all of a loop iteration's deltas (a step
  of 16 sequences: one pickle and one wake-up of the replica's reader, not 16), and
  `("active", number of sequences)` when that number changes.
It pins itself to the CPU ids when given and asks for niceness 0 (`engine.threads`: Ray's
workers run at nice 15, which it would inherit), builds the engine from the config, runs
`EngineLoop` on its main thread, and exits when the replica closes its end or dies. When the child dies, its
reader thread calls `ModelServer.recover`, which starts a new child (`restart`) and replays. The
next child is started ahead (a spare): it imports its libraries, then waits for its config, so a
restart only loads the models.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from dspark_ray.config import EngineConfig
from dspark_ray.serving.engine_loop import Command, EngineLoop
from dspark_ray.serving.protocol import CompletionDelta

if TYPE_CHECKING:
    from dspark_ray.engine.engine import SpeculativeEngine
    from dspark_ray.serving.model_server import ModelServer

SHUTDOWN_WAIT_S = 10.0


@dataclass(frozen=True)
class _Child:
    """An engine process and the replica's ends of its pipes."""

    process: subprocess.Popen
    commands: Connection
    events: Connection

    @classmethod
    def start(cls) -> _Child:
        child_commands, commands = Pipe(duplex=False)
        events, child_events = Pipe(duplex=False)
        fds = (child_commands.fileno(), child_events.fileno())
        process = subprocess.Popen([sys.executable, "-m", __name__, *map(str, fds)], pass_fds=fds)
        child_commands.close()  # the child holds these ends now: its exit shows here as end of file
        child_events.close()
        return cls(process, commands, events)

    def close(self) -> None:
        """Close its commands (it exits at end of file) and wait; kill it if it does not exit."""
        self.commands.close()
        try:
            self.process.wait(timeout=SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EngineProcess:
    def __init__(self, engine_config: EngineConfig, num_threads: int, cpus: tuple[int, ...] | None = None) -> None:
        self.engine_config = engine_config
        self.num_threads = num_threads
        self.cpus = cpus
        self.context_limit = 0  # known once the child is ready
        self._num_active = 0
        self._send_lock = threading.Lock()
        self._closing = False
        self._spare: _Child | None = None  # the next restart's child, its libraries imported

    def start(self, server: ModelServer) -> None:
        """Start the child and wait until its engine is built; raises if it fails to build."""
        self._server = server
        self._spawn()

    def restart(self) -> None:
        """A new child after the last one died (on the dead one's reader thread)."""
        if self._closing:
            raise RuntimeError("the engine process is shutting down")
        self._child.commands.close()
        self._spawn()

    def _spawn(self) -> None:
        child, self._spare = self._spare or _Child.start(), None
        with self._send_lock:
            self._child = child
        child.commands.send((self.engine_config, self.num_threads, self.cpus))
        self.context_limit = self._wait_ready(child.events)
        self._reader = threading.Thread(target=self._read_events, args=(child.events,), name="engine-events",
                                        daemon=True)
        self._reader.start()
        if not self._closing:
            self._spare = _Child.start()

    @property
    def _process(self) -> subprocess.Popen:
        return self._child.process

    def submit(self, command: Command) -> None:
        try:
            with self._send_lock:
                self._child.commands.send(command)
        except OSError:  # the child is gone: its reader restarts it and replays what is open
            pass

    @property
    def num_active(self) -> int:
        return self._num_active

    def is_alive(self) -> bool:
        return self._process.poll() is None and self._reader.is_alive()

    def shutdown(self) -> None:
        self._closing = True
        spare, self._spare = self._spare, None
        self._child.close()
        if spare is not None:
            spare.close()

    def _wait_ready(self, events: Connection) -> int:
        try:
            kind, detail = events.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while starting (code {self._process.wait()})") from None
        if kind == "failed":
            self._process.wait()
            raise RuntimeError(f"the engine process failed to start:\n{detail}")
        return detail

    def _read_events(self, events: Connection) -> None:
        server = self._server
        try:
            while True:
                kind, *detail = events.recv()
                if kind == "deltas":
                    server.deliver_all(detail[0])
                else:
                    self._num_active = detail[0]
        except (EOFError, OSError):
            pass
        events.close()
        if not self._closing:
            self._num_active = 0
            server.recover(f"the engine process exited (code {self._process.wait()})")


def build_local_engine(engine_config: EngineConfig) -> tuple[SpeculativeEngine, Callable[[list[int]], str]]:
    """An engine in this process, and the decoder of its output tokens."""
    from dspark_ray.engine.factory import build_engine, load_models

    models = load_models(engine_config)
    tokenizer = models.tokenizer
    return build_engine(engine_config, models), lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def main(commands_fd: int, events_fd: int) -> int:
    commands = Connection(commands_fd, writable=False)
    events = Connection(events_fd, readable=False)
    import torch  # before the config comes: a spare child is ready to build its engine at once

    import dspark_ray.engine.factory  # noqa: F401
    from dspark_ray.engine.threads import configure_threads

    try:
        engine_config, num_threads, cpus = commands.recv()
    except EOFError:  # a spare that was not needed
        return 0
    try:
        configure_threads(num_threads, cpus)
        engine, decode = build_local_engine(engine_config)
    except Exception:
        events.send(("failed", traceback.format_exc()))
        return 1
    events.send(("ready", engine.stop_rules.context_limit))
    reported = 0

    def report_active() -> None:
        nonlocal reported
        if loop.num_active != reported:
            reported = loop.num_active
            events.send(("active", reported))

    pending: list[tuple[int, CompletionDelta]] = []

    def flush() -> None:
        report_active()  # a running request's delta never arrives before the count that holds it
        if pending:
            events.send(("deltas", pending.copy()))
            pending.clear()

    loop = EngineLoop(engine, decode, lambda ticket, delta: pending.append((ticket, delta)))

    try:
        loop.run(lambda timeout: commands.recv() if commands.poll(timeout) else None,
                 keep_going=lambda: True, after_iteration=flush)
    except (EOFError, OSError):  # the replica closed its end, or died
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
