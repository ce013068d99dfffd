"""The served path with the distributed backend: Serve app -> ModelServer replica -> TP=2 target
ranks (gloo on CPU) and a draft worker; greedy output identical to target-only decoding."""

from __future__ import annotations

import asyncio

import openai
import pytest

from dspark_ray.serving.config import AppConfig

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "for i in range(10):", "The quick brown fox"]
MAX_TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_app(deploy_app, engine_config):
    from ray import serve

    config = AppConfig(model_name="tp2", engine=engine_config, workers={"mode": "distributed", "placement": {"tp": 2}},
                       model_server_num_cpus=0.25, router_num_cpus=0.1)
    app = deploy_app("tp2", "/tp2", config)
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
