"""The local engine in a process of its own (`EngineProcess`), behind the same `ModelServer` front
as the engine on a thread: the same tokens, aborts free the child's sequences, a child that cannot
build its engine fails the start with its traceback, shutting down ends the child, and the child
runs on the CPUs it is given. A child that dies or stalls: test_engine_crash.py."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from dspark_ray.serving.engine_process import EngineProcess
from dspark_ray.serving.model_server import ModelServer
from dspark_ray.serving.protocol import CompletionRequest

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def process_server(engine_config):
    server = ModelServer(EngineProcess(engine_config, num_threads=1))
    yield server
    server.shutdown()


async def _tokens(server: ModelServer, request: CompletionRequest) -> list[int]:
    tokens = []
    async for delta in server.generate(request):
        assert delta.finish_reason != "error", delta.error
        tokens.extend(delta.token_ids)
    return tokens


def _request(target_only, index: int, prompt: str, max_tokens: int = MAX_TOKENS) -> CompletionRequest:
    """Greedy, ending at EOS as the oracle's requests do; the long ones decode to their end."""
    return CompletionRequest(f"r{index}", target_only.encode(prompt), max_tokens=max_tokens,
                             ignore_eos=max_tokens > MAX_TOKENS)


def _wait_until(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_greedy_output_identical_to_target_only_at_concurrency_3(process_server, target_only) -> None:
    async def scenario():
        return await asyncio.gather(*(_tokens(process_server, _request(target_only, i, prompt))
                                      for i, prompt in enumerate(PROMPTS)))

    outputs = asyncio.run(scenario())
    assert outputs == [target_only.generate(target_only.encode(prompt), MAX_TOKENS) for prompt in PROMPTS]
    assert process_server.runner.context_limit > 0
    assert _wait_until(lambda: process_server.num_active == 0)


def test_a_closed_stream_frees_its_sequence_in_the_child(process_server, target_only) -> None:
    async def scenario():
        deltas = process_server.generate(_request(target_only, 0, PROMPTS[0], max_tokens=512))
        await deltas.__anext__()  # admitted and decoding
        active_while_open = process_server.num_active
        await deltas.aclose()  # the client went away
        return active_while_open

    assert _wait_until(lambda: process_server.num_active == 0)
    assert asyncio.run(scenario()) == 1
    assert _wait_until(lambda: process_server.num_active == 0)
    assert process_server.is_alive()


def test_a_child_that_cannot_build_its_engine_fails_the_start(engine_config, tmp_path) -> None:
    broken = engine_config.model_copy(update={"target": tmp_path / "no-such-model"})
    with pytest.raises(RuntimeError, match="engine process failed to start") as raised:
        ModelServer(EngineProcess(broken, num_threads=1))
    assert "no-such-model" in str(raised.value)


def test_shutdown_ends_the_child(engine_config) -> None:
    server = ModelServer(EngineProcess(engine_config, num_threads=1))
    process = server.runner._process
    server.shutdown()
    assert process.poll() == 0
    assert not server.is_alive()


def test_the_child_runs_on_the_cpus_it_is_given(engine_config, target_only) -> None:
    cpu = max(os.sched_getaffinity(0))
    server = ModelServer(EngineProcess(engine_config, num_threads=1, cpus=(cpu,)))

    async def scenario():
        return await _tokens(server, _request(target_only, 0, PROMPTS[0]))

    try:
        assert os.sched_getaffinity(server.runner._process.pid) == {cpu}
        assert asyncio.run(scenario()) == target_only.generate(target_only.encode(PROMPTS[0]), MAX_TOKENS)
    finally:
        server.shutdown()


def test_cpus_the_machine_lacks_fail_the_start(engine_config) -> None:
    with pytest.raises(RuntimeError, match="engine process failed to start") as raised:
        ModelServer(EngineProcess(engine_config, num_threads=1, cpus=(100_000,)))
    assert "Invalid argument" in str(raised.value)
