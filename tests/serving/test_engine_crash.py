"""A local engine process that dies or stalls: the server restarts it and replays every open
request from what its client was sent (greedy streams end exactly as the target alone, seeded
sampled ones exactly as an uninterrupted run, text and usage as one stream); restarts that keep failing fail the requests and leave the server down; a
stopped engine with pending work fails the health check, an idle one never does."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.engine_process import EngineProcess
from dspark_ray.serving.model_server import MAX_RESTARTS_IN_A_ROW, ModelServer
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest
from dspark_ray.serving.served_model import ServedModel

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):",
           "The quick brown fox"]
NUM_STREAMS = 16
MAX_TOKENS = 48


async def _collect(server: ModelServer, request: CompletionRequest, progress: dict) -> list[CompletionDelta]:
    deltas = []
    async for delta in server.generate(request):
        deltas.append(delta)
        progress[request.request_id] = progress.get(request.request_id, 0) + len(delta.token_ids)
    return deltas


async def _collect_all(server: ModelServer, requests: list[CompletionRequest]) -> list[list[CompletionDelta]]:
    return await asyncio.gather(*(_collect(server, request, {}) for request in requests))


async def _kill_midway(server: ModelServer, requests: list[CompletionRequest]) -> list[list[CompletionDelta]]:
    """Run the requests; SIGKILL the engine process once every one has streamed some tokens."""
    progress: dict[str, int] = {}
    tasks = [asyncio.create_task(_collect(server, request, progress)) for request in requests]
    while len(progress) < len(requests) or min(progress.values()) < 2:
        assert not any(task.done() for task in tasks), "a stream ended before the kill"
        await asyncio.sleep(0.01)
    os.kill(server.runner._process.pid, signal.SIGKILL)
    return await asyncio.wait_for(asyncio.gather(*tasks), 300)


def _tokens(deltas: list[CompletionDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def _assert_one_coherent_stream(deltas: list[CompletionDelta], request: CompletionRequest, decode) -> None:
    """No error; the text is the decoded tokens, with nothing repeated or missing; usage counts the
    original prompt and every output token."""
    assert [delta.finish_reason for delta in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason in ("stop", "length"), deltas[-1].error
    tokens = _tokens(deltas)
    assert "".join(delta.text for delta in deltas) == decode(tokens)
    assert (deltas[-1].num_prompt_tokens, deltas[-1].num_output_tokens) == (len(request.prompt_token_ids), len(tokens))


def test_a_killed_engine_process_replays_16_greedy_and_4_seeded_streams_identically(engine_config,
                                                                                    target_only) -> None:
    server = ModelServer(EngineProcess(engine_config, num_threads=1))
    greedy = [CompletionRequest(f"g{i}", target_only.encode(PROMPTS[i % len(PROMPTS)]), max_tokens=MAX_TOKENS)
              for i in range(NUM_STREAMS)]
    seeded = [CompletionRequest(f"s{i}", target_only.encode(PROMPTS[i]), SamplingParams(temperature=0.8, seed=i),
                                max_tokens=MAX_TOKENS) for i in range(len(PROMPTS))]
    decode = lambda ids: target_only.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    first_pid = server.runner._process.pid
    try:
        outputs = asyncio.run(_kill_midway(server, greedy + seeded))
        after = asyncio.run(_collect(server, greedy[1], {}))
        uninterrupted = asyncio.run(_collect_all(server, seeded))  # the restarted engine, never killed
    finally:
        server.shutdown()
    for request, deltas in zip(greedy + seeded, outputs):
        _assert_one_coherent_stream(deltas, request, decode)
    for request, deltas in zip(greedy, outputs):
        assert _tokens(deltas) == target_only.generate(request.prompt_token_ids, MAX_TOKENS), request.request_id
    for request, deltas, reference in zip(seeded, outputs[len(greedy):], uninterrupted):
        assert _tokens(deltas) == _tokens(reference), request.request_id
    assert _tokens(after) == target_only.generate(greedy[1].prompt_token_ids, MAX_TOKENS)  # serving resumed
    assert server.num_restarts == 1 and server.runner._process.pid != first_pid


def test_restarts_that_keep_failing_fail_the_requests_and_the_server(engine_config, target_only, tmp_path) -> None:
    server = ModelServer(EngineProcess(engine_config, num_threads=1))
    request = CompletionRequest("r", target_only.encode(PROMPTS[0]), max_tokens=512, ignore_eos=True)

    async def scenario():
        deltas = server.generate(request)
        first = await deltas.__anext__()
        server.runner.engine_config = engine_config.model_copy(update={"target": tmp_path / "gone"})
        os.kill(server.runner._process.pid, signal.SIGKILL)
        rest = [delta async for delta in deltas]
        refused = [delta async for delta in server.generate(request)]
        return first, rest, refused

    try:
        first, rest, refused = asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        server.shutdown()
    assert rest[-1].finish_reason == "error"
    assert f"{MAX_RESTARTS_IN_A_ROW} restarts in a row" in rest[-1].error and "gone" in rest[-1].error
    assert rest[-1].num_output_tokens == len(first.token_ids) + sum(len(delta.token_ids) for delta in rest)
    assert [delta.finish_reason for delta in refused] == ["error"]  # refused at once, not hung
    assert not server.is_alive()


def _wait_for(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _health_problem(served: ServedModel) -> str | None:
    try:
        served.check_health()
    except RuntimeError as error:
        return str(error)
    return None


def test_a_stopped_engine_with_pending_work_fails_the_health_check_an_idle_one_never(engine_config,
                                                                                    target_only) -> None:
    served = ServedModel(AppConfig(engine=engine_config, engine_stall_timeout_s=1.0))
    request = CompletionRequest("r", target_only.encode(PROMPTS[0]), max_tokens=MAX_TOKENS)
    pid = served.server.runner._process.pid

    async def scenario():
        deltas = served.server.generate(request)
        received = [await deltas.__anext__()]
        os.kill(pid, signal.SIGSTOP)
        stalled = await asyncio.to_thread(_wait_for, lambda: _health_problem(served) is not None)
        problem = _health_problem(served)
        os.kill(pid, signal.SIGCONT)
        received += [delta async for delta in deltas]
        return stalled, problem, received

    try:
        time.sleep(2 * served.config.engine_stall_timeout_s)
        assert _health_problem(served) is None  # idle for longer than the timeout: healthy
        stalled, problem, received = asyncio.run(asyncio.wait_for(scenario(), 300))
        assert stalled and "has requests waiting and has emitted nothing" in problem
        assert _tokens(received) == target_only.generate(request.prompt_token_ids, MAX_TOKENS)
        assert _health_problem(served) is None  # it went on, and is idle again
    finally:
        os.kill(pid, signal.SIGCONT)
        served.server.shutdown()
