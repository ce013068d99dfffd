"""The served path with the distributed backend: Serve app -> ModelServer replica -> TP=2 target
ranks (gloo on CPU) and a draft worker; greedy output identical to target-only decoding, also
when the draft worker's process is killed in the middle of concurrent streams."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from dspark_ray.serving.config import AppConfig

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "for i in range(10):", "The quick brown fox"]
MAX_TOKENS = 16

pytestmark = pytest.mark.slow
THIS_APPS_DRAFT_WORKERS: set[str] = set()  # actor ids, filled by the tp_app fixture


def draft_worker_pids() -> dict[str, int]:
    """Live DraftWorker actors of the cluster: actor id -> process id (from the GCS)."""
    from ray._private import state

    return {actor_id: info["Pid"] for actor_id, info in state.actors().items()
            if info["ActorClassName"] == "DraftWorker" and info["State"] == "ALIVE"}


@pytest.fixture(scope="module")
def tp_app(deploy_app, engine_config):
    from ray import serve

    config = AppConfig(model_name="tp2", engine=engine_config, workers={"mode": "distributed", "placement": {"tp": 2}},
                       model_server_num_cpus=0.25, router_num_cpus=0.1)
    others = draft_worker_pids()
    app = deploy_app("tp2", "/tp2", config)
    THIS_APPS_DRAFT_WORKERS.update(set(draft_worker_pids()) - set(others))  # other tests run their own
    yield app
    serve.delete("tp2")


@pytest.mark.parametrize("stream", [False, True])
def test_tp2_greedy_identical_to_target_only_at_concurrency_4(tp_app, target_only, stream: bool) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> list[int]:
        kwargs = dict(model="tp2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"return_token_ids": True})
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].model_extra["token_ids"]
        ids = []
        async for event in await client.completions.create(stream=True, **kwargs):
            ids += event.choices[0].model_extra["token_ids"]
        return ids

    async def all_at_once() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=tp_app.base_url, api_key="unused", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    for prompt, output in zip(PROMPTS, asyncio.run(all_at_once())):
        assert output == target_only.generate(target_only.encode(prompt), MAX_TOKENS), prompt
    assert tp_app.wait_until_idle() == 0


def test_killed_draft_worker_mid_stream_changes_no_text(tp_app, target_only) -> None:
    """SIGKILL the app's draft worker while four streams are open: every stream completes with the
    target-only text (its sequences go on target-only), nothing leaks, and a new worker comes up."""
    (draft_id,) = THIS_APPS_DRAFT_WORKERS
    before = draft_worker_pids()
    pid = before[draft_id]
    max_tokens = 96
    open_streams: set[str] = set()
    all_started = asyncio.Event()

    async def one(client: openai.AsyncOpenAI, prompt: str) -> list[int]:
        ids = []
        stream = await client.completions.create(model="tp2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True})
        async for event in stream:
            ids += event.choices[0].model_extra["token_ids"]
            open_streams.add(prompt)
            if len(open_streams) == len(PROMPTS):
                all_started.set()
            if event.choices[0].finish_reason is not None:
                open_streams.discard(prompt)
        return ids

    async def kill_mid_stream() -> tuple[list[list[int]], int]:
        async with openai.AsyncOpenAI(base_url=tp_app.base_url, api_key="unused", max_retries=0, timeout=300) as c:
            tasks = [asyncio.create_task(one(c, prompt)) for prompt in PROMPTS]
            await asyncio.wait_for(all_started.wait(), timeout=120)
            os.kill(pid, signal.SIGKILL)
            still_open = len(open_streams)
            return await asyncio.gather(*tasks), still_open

    outputs, still_open = asyncio.run(kill_mid_stream())

    assert still_open > 0  # the worker died while streams were running
    for prompt, output in zip(PROMPTS, outputs):
        assert output == target_only.generate(target_only.encode(prompt), max_tokens), prompt
    assert tp_app.wait_until_idle() == 0
    deadline = time.monotonic() + 120
    while not set(draft_worker_pids()) - set(before):  # the replacement (no other test runs meanwhile)
        assert time.monotonic() < deadline, "no new draft worker came up"
        time.sleep(0.5)
