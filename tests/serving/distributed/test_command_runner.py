"""A worker's command runner: one command at a time, and background work between commands that
yields to the next command (the draft worker's look-ahead runs this way)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from dspark_ray.serving.distributed.server import CommandRunner


class AbortedContext:
    def abort(self, code: grpc.StatusCode, details: str):
        raise RuntimeError(f"{code.name}: {details}")


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_work_runs_after_the_command_and_counts_as_busy_not_as_a_command() -> None:
    runner, done = CommandRunner(), threading.Event()
    order = []

    def command():
        runner.run_after_this_command(lambda should_stop: (time.sleep(0.05), order.append("work"), done.set()))
        order.append("command")

    runner.run(AbortedContext(), command)
    assert done.wait(5)
    assert order == ["command", "work"]
    wait_until(lambda: runner.clock.busy_s >= 0.05)
    assert runner.clock.num_commands == 1


def test_a_waiting_command_stops_the_work_and_runs_next() -> None:
    runner = CommandRunner()
    started, stopped_after = threading.Event(), []

    def work(should_stop):
        started.set()
        begin = time.monotonic()
        while not should_stop():
            assert time.monotonic() - begin < 5, "never told to stop"
            time.sleep(0.001)
        stopped_after.append(time.monotonic() - begin)

    runner.run(AbortedContext(), lambda: runner.run_after_this_command(work))
    assert started.wait(5)
    runner.run(AbortedContext(), lambda: None)  # waits for the work to yield, then runs
    assert len(stopped_after) == 1


def test_work_is_dropped_when_another_command_came_first() -> None:
    runner, ran = CommandRunner(), []
    gate = threading.Lock()
    gate.acquire()  # hold the background thread busy so the next command overtakes the work
    runner._background.submit(gate.acquire)
    runner.run(AbortedContext(), lambda: runner.run_after_this_command(lambda should_stop: ran.append(1)))
    runner.run(AbortedContext(), lambda: None)
    gate.release()
    runner._background.submit(lambda: None).result(timeout=5)
    assert ran == []


def test_failing_work_is_logged_and_commands_go_on(caplog) -> None:
    runner = CommandRunner()

    def failing(should_stop):
        raise ValueError("broken look-ahead")

    runner.run(AbortedContext(), lambda: runner.run_after_this_command(failing))
    runner._background.submit(lambda: None).result(timeout=5)
    assert "background work between commands failed" in caplog.text
    assert runner.run(AbortedContext(), lambda: 42) == 42


def test_command_errors_become_grpc_aborts() -> None:
    def broken():
        raise KeyError("x")

    with pytest.raises(RuntimeError, match="INTERNAL"):
        CommandRunner().run(AbortedContext(), broken)
