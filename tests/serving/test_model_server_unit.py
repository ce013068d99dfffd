"""`ModelServer` without Ray or an engine: deltas that queue up while the stream's reader is busy
leave as one piece, and a reader that keeps up gets every delta as it came; a runner that died is
restarted and the open request replayed as the continuation of what its client got, restarts that
keep failing fail it; only pending work can stall."""

from __future__ import annotations

import asyncio

import pytest
from serving_helpers import ScriptedRunner

from dspark_ray.serving.model_server import MAX_RESTARTS_IN_A_ROW, ModelServer
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest, SpeculativeStats

STATS = SpeculativeStats(num_steps=3, num_draft_tokens=6, num_accepted_tokens=4, num_accepted_per_position=[2, 2])


def deltas() -> list[CompletionDelta]:
    pieces = [([5], "a"), ([6, 7], "bc"), ([8], "d")]
    made = [CompletionDelta("r", tokens, text, 4, 1 + index) for index, (tokens, text) in enumerate(pieces)]
    return made + [CompletionDelta("r", [9], "e", 4, 5, finish_reason="length", stats=STATS)]


async def read(server: ModelServer, deliver_all_at_once: bool) -> list[CompletionDelta]:
    stream = server.generate(CompletionRequest("r", [1, 2, 3, 4]))
    received = []
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the request is submitted and its queue open
    for delta in deltas():
        server.deliver(0, delta)
        if not deliver_all_at_once:
            received.append(await pending)
            pending = asyncio.ensure_future(anext(stream, None))
    received.append(await pending)  # all at once: the only one; else None, the end of the stream
    return [delta for delta in received if delta is not None]


def test_deltas_that_queued_up_leave_as_one() -> None:
    server = ModelServer(ScriptedRunner())

    (merged,) = asyncio.run(read(server, deliver_all_at_once=True))

    assert merged == CompletionDelta("r", [5, 6, 7, 8, 9], "abcde", 4, 5, finish_reason="length", stats=STATS)
    assert [kind for kind, _, _ in server.runner.commands] == ["add", "abort"]


def test_a_reader_that_keeps_up_gets_every_delta() -> None:
    server = ModelServer(ScriptedRunner())

    received = asyncio.run(read(server, deliver_all_at_once=False))

    assert received == deltas()
    assert [kind for kind, _, _ in server.runner.commands] == ["add", "abort"]


@pytest.mark.parametrize("restarts_fail", [False, True])
def test_a_dead_runner_is_restarted_and_the_open_request_replayed(restarts_fail) -> None:
    server = ModelServer(ScriptedRunner())
    server.runner.restarts_fail = restarts_fail

    async def scenario() -> list[CompletionDelta]:
        assert server.stalled_s() == 0.0  # idle
        stream = server.generate(CompletionRequest("r", [1, 2, 3, 4], max_tokens=10))
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        for delta in deltas()[:2]:
            server.deliver(0, delta)
        server.recover("the engine process exited (code -9)")
        received = [await pending]
        if restarts_fail:
            received += [delta async for delta in stream]
        else:
            await stream.aclose()
        return received

    received = asyncio.run(scenario())
    if restarts_fail:
        assert received[-1].finish_reason == "error" and received[-1].num_output_tokens == 3
        assert received[-1].error == ("the engine process exited (code -9); restarting it failed: still none "
                                      f"({MAX_RESTARTS_IN_A_ROW} restarts in a row without progress)")
        assert not server.is_alive() and [kind for kind, _, _ in server.runner.commands] == ["add"]
    else:
        (_, ticket, replay), abort = server.runner.commands[1:]
        assert replay == CompletionRequest("r", [1, 2, 3, 4, 5, 6, 7], max_tokens=7, num_resumed_tokens=3,
                                           num_resumed_chars=3)
        assert (replay.num_original_prompt_tokens, abort[0]) == (4, "abort") and server.num_restarts == 1
        assert server.is_alive()
