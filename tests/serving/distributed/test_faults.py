"""Worker faults: a dead draft worker costs speed, never output; a dead target rank is rebuilt and
the open requests replayed on it, with the same output; client aborts leak no sequences; an
idle tensor-parallel group is no fault."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from conftest import PROMPTS, engine_config, greedy_requests, outputs
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.serving.model_server import ModelServer
from dspark_ray.serving.protocol import CompletionRequest
from dspark_ray.serving.wire import worker_pb2 as pb

@pytest.fixture
def tp1(distributed_engines):
    return distributed_engines("llama", "model", tp=1, tp_sharding="auto")


@pytest.fixture
def tp2(distributed_engines):
    return distributed_engines("qwen3_moe", "model", tp=2, tp_sharding="auto")


def _target_only(config):
    return config.model_copy(update={"drafter": "none"})


def _tokens(deltas) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def _wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_draft_worker_changes_nothing_and_comes_back(tp1, local_outputs) -> None:
    engine, _, config = tp1
    requests = greedy_requests(max_tokens=40)
    expected = local_outputs(_target_only(config), requests)
    seqs = [engine.add_request(request) for request in requests]
    for _ in range(3):
        engine.step()
    assert sum(seq.stats.num_draft_tokens for seq in seqs) > 0
    restarts = engine.draft.num_restarts
    ray.kill(engine.draft.actors[0])
    drafted_before = sum(seq.stats.num_draft_tokens for seq in seqs)
    while engine.has_unfinished():
        engine.step()
    assert outputs(seqs) == expected  # target-only output, token for token
    _wait_until(lambda: engine.draft.num_restarts == restarts + 1 and engine.draft.current() is not None)
    again = engine.generate(requests)
    assert outputs(again) == expected
    assert sum(seq.stats.num_draft_tokens for seq in again) > 0  # speculating again
    assert drafted_before > 0


def test_client_aborts_free_every_sequence(tp1) -> None:
    engine, decode, _ = tp1

    async def scenario() -> None:
        server = ModelServer.on_thread(engine, decode)
        try:
            streams = [server.generate(CompletionRequest(f"r{i}", prompt, max_tokens=200))
                       for i, prompt in enumerate(PROMPTS)]
            for stream in streams:
                await stream.__anext__()  # the request is running
            assert server.num_active == len(PROMPTS)
            for stream in streams:
                await stream.aclose()  # the client went away
            for _ in range(200):
                if server.num_active == 0:
                    break
                await asyncio.sleep(0.05)
            assert server.num_active == 0
        finally:
            server.shutdown()

    asyncio.run(scenario())
    assert not engine.has_unfinished()
    for handle in (engine.target, engine.draft):
        stub, _ = handle.current()
        assert stub.Health(pb.HealthRequest(), timeout=10).num_sequences == 0


@pytest.mark.slow
def test_killed_target_rank_replays_16_streams_identically(tp2, local_outputs) -> None:
    """The group is rebuilt and every open request goes on where its client was: 16/16 end as the
    target alone, text and usage as one stream; a request after it too; 4 seeded sampled requests
    beside them end with the text of an uninterrupted run."""
    engine, decode, config = tp2
    greedy = [CompletionRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], max_tokens=60) for i in range(16)]
    seeded = [CompletionRequest(f"s{i}", PROMPTS[i], SamplingParams(temperature=0.8, seed=i), max_tokens=60)
              for i in range(4)]
    requests = greedy + seeded
    restarts = engine.target.num_restarts

    async def collect(server: ModelServer, request: CompletionRequest):
        return [delta async for delta in server.generate(request)]

    async def scenario():
        server = ModelServer.on_thread(engine, decode)
        try:
            tasks = [asyncio.create_task(collect(server, request)) for request in requests]
            while len(engine.running) < len(requests) or min(len(seq.output_token_ids) for seq in engine.running) < 3:
                assert not any(task.done() for task in tasks), "a stream ended before the kill"
                await asyncio.sleep(0.02)
            ray.kill(engine.target.actors[1])  # a follower rank: rank 0's collectives fail
            replayed = await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
            after = await asyncio.wait_for(collect(server, requests[0]), timeout=300)
            uninterrupted = await asyncio.wait_for(asyncio.gather(*(collect(server, r) for r in seeded)), 300)
            return replayed, after, uninterrupted
        finally:
            server.shutdown()

    replayed, after, uninterrupted = asyncio.run(scenario())
    for request, deltas, reference in zip(seeded, replayed[len(greedy):], uninterrupted):
        assert deltas[-1].finish_reason in ("stop", "length"), deltas[-1].error
        assert _tokens(deltas) == _tokens(reference), request.request_id
    expected = local_outputs(_target_only(config), [GenerationRequest(r.prompt_token_ids, max_tokens=60)
                                                    for r in greedy])
    for request, deltas, tokens in zip(greedy, replayed, expected):
        assert deltas[-1].finish_reason == "length", deltas[-1].error
        assert [token for delta in deltas for token in delta.token_ids] == tokens
        assert "".join(delta.text for delta in deltas) == decode(tokens)
        assert (deltas[-1].num_prompt_tokens, deltas[-1].num_output_tokens) == (len(request.prompt_token_ids), 60)
    assert [token for delta in after for token in delta.token_ids] == expected[0]
    assert engine.target.num_restarts == restarts + 1


def test_an_idle_tensor_parallel_group_outlives_its_command_timeout(engines_for, tiny, local_outputs) -> None:
    """Followers wait for the next command however long the replica idles; only the collectives of a
    command are bounded by target_timeout_s."""
    config = engine_config(tiny("llama"), "none")
    engine, _ = engines_for(config, tp=2, target_timeout_s=3)
    time.sleep(5)
    requests = greedy_requests(max_tokens=4)
    assert outputs(engine.generate(requests)) == local_outputs(config, requests)
    assert engine.target.num_restarts == 0
