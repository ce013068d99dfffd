"""One request whose steps fail, among others: its stream ends with an error delta, the others get
their whole text, identical to the target alone (the engine's fault isolation, through the engine
loop, the model server, and the served app with a poisoned parameter)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import openai
import pytest

from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.serving.engine_loop import EngineLoop
from dspark_ray.serving.model_server import ModelServer
from dspark_ray.serving.protocol import CompletionRequest

TEXTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef list_files(path):",
         'def parse_config(path):\n    """Read', "for i in range(10):", "The quick brown fox",
         "x = [1, 2, 3]\ny =", "def main():\n    args ="]
POISONED_TEXT = "def poisoned():"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def models(engine_config):
    return load_models(engine_config)


def poisoned_engine(engine_config, models, monkeypatch, poisoned_prompt: list[int]):
    """The served engine whose stop rules raise for the request with `poisoned_prompt` once it
    has 3 output tokens (a fault in one sequence, mid-stream)."""
    engine = build_engine(engine_config, models)
    append = engine.stop_rules.append

    def poisoned(seq, tokens):
        if seq.request.prompt_token_ids == poisoned_prompt and len(seq.output_token_ids) >= 3:
            raise RuntimeError("poisoned")
        append(seq, tokens)

    monkeypatch.setattr(engine.stop_rules, "append", poisoned)
    return engine


def requests(target_only) -> list[CompletionRequest]:
    prompts = [target_only.encode(text) for text in TEXTS[:4] + [POISONED_TEXT] + TEXTS[4:]]
    return [CompletionRequest(f"r{index}", prompt, max_tokens=MAX_TOKENS) for index, prompt in enumerate(prompts)]


def check(deltas_by_request: list[list], target_only) -> None:
    """The poisoned request (index 4) ends with an error; every other one streamed the target's text."""
    texts = TEXTS[:4] + [POISONED_TEXT] + TEXTS[4:]
    for index, (text, deltas) in enumerate(zip(texts, deltas_by_request)):
        token_ids = [token for delta in deltas for token in delta.token_ids]
        last = deltas[-1]
        if index == 4:
            assert last.finish_reason == "error" and "poisoned" in last.error
            assert len(token_ids) >= 3 and last.num_output_tokens == len(token_ids)
            continue
        expected = target_only.generate(target_only.encode(text), MAX_TOKENS)
        assert token_ids == expected, text
        text_streamed = "".join(delta.text for delta in deltas)
        assert text_streamed == target_only.tokenizer.decode(expected, skip_special_tokens=True)
        assert last.finish_reason in ("stop", "length") and last.error is None


def test_the_engine_loop_ends_the_failed_stream_alone(engine_config, models, target_only, monkeypatch) -> None:
    batch = requests(target_only)
    engine = poisoned_engine(engine_config, models, monkeypatch, batch[4].prompt_token_ids)
    sent = defaultdict(list)
    loop = EngineLoop(engine, lambda ids: models.tokenizer.decode(ids, skip_special_tokens=True),
                      lambda ticket, delta: sent[ticket].append(delta))
    for ticket, request in enumerate(batch):
        loop.handle(("add", ticket, request))
    while loop.has_work():
        loop.step()

    check([sent[ticket] for ticket in range(len(batch))], target_only)
    assert loop.num_active == 0


def test_model_server_streams_outlive_a_poisoned_neighbour(engine_config, models, target_only, monkeypatch) -> None:
    batch = requests(target_only)
    engine = poisoned_engine(engine_config, models, monkeypatch, batch[4].prompt_token_ids)

    async def scenario() -> list[list]:
        server = ModelServer.on_thread(engine, lambda ids: models.tokenizer.decode(ids, skip_special_tokens=True))
        try:
            async def collect(request: CompletionRequest) -> list:
                return [delta async for delta in server.generate(request)]
            return await asyncio.gather(*(collect(request) for request in batch))
        finally:
            server.shutdown()

    check(asyncio.run(scenario()), target_only)


def test_a_poisoned_parameter_during_8_greedy_streams(served_app, target_only) -> None:
    """Finding 1 of issue 22: top_k 2**63 once failed every sequence of its step."""
    async def greedy(client: openai.AsyncOpenAI, text: str) -> list[int]:
        token_ids = []
        async for event in await client.completions.create(
                model=served_app.config.model_name, prompt=text, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_body={"return_token_ids": True}):
            token_ids += (event.choices[0].model_extra or {})["token_ids"]
        return token_ids

    async def poisoned(client: openai.AsyncOpenAI) -> None:
        await asyncio.sleep(0.2)  # the greedy streams are running
        with pytest.raises(openai.APIStatusError):  # refused (4xx at the edge) or failed alone (an error)
            await client.completions.create(model=served_app.config.model_name, prompt=POISONED_TEXT,
                                            max_tokens=MAX_TOKENS, temperature=1.0, extra_body={"top_k": 2**63})

    async def scenario() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=served_app.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as client:
            *outputs, _ = await asyncio.gather(*(greedy(client, text) for text in TEXTS), poisoned(client))
            return outputs

    for text, output in zip(TEXTS, asyncio.run(scenario())):
        assert output == target_only.generate(target_only.encode(text), MAX_TOKENS), text
    assert served_app.wait_until_idle() == 0
