"""The real `openai` client against a real Serve app: greedy output identical to target-only decoding.

Speculative serving (draft LM) must give, token for token, what the in-process engine gives with
drafter none, whatever the batch it shares (concurrency 1 and 8), streamed or not.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from dspark_ray.serving.openai_api import ChatMessage
from dspark_ray.serving.served_model import render_chat

PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef list_files(path):",
    'def parse_config(path):\n    """Read',
    "for i in range(10):",
    "The quick brown fox",
    "x = [1, 2, 3]\ny =",
    "def main():\n    args =",
]
MAX_TOKENS = 16
EXTRA = {"return_token_ids": True}


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(served_app) -> openai.OpenAI:
    return _client(served_app)


def _extra(obj, name: str):
    return (obj.model_extra or {})[name]


def test_completions_greedy_identical_to_target_only(any_app, target_only) -> None:
    client = _client(any_app)
    for prompt in PROMPTS[:3]:
        response = client.completions.create(model=any_app.config.model_name, prompt=prompt,
                                              max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
        expected = target_only.generate(target_only.encode(prompt), MAX_TOKENS)
        choice = response.choices[0]
        assert _extra(choice, "token_ids") == expected, prompt
        assert choice.text == target_only.tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason in ("stop", "length")


def test_streaming_greedy_identical_to_target_only(any_app, target_only) -> None:
    client = _client(any_app)
    for prompt in PROMPTS[3:6]:
        stream = client.completions.create(model=any_app.config.model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body=EXTRA)
        token_ids, text, finish_reasons = [], "", []
        for event in stream:
            choice = event.choices[0]
            token_ids += _extra(choice, "token_ids")
            text += choice.text
            finish_reasons.append(choice.finish_reason)
        expected = target_only.generate(target_only.encode(prompt), MAX_TOKENS)
        assert token_ids == expected, prompt
        assert text == target_only.tokenizer.decode(expected, skip_special_tokens=True)
        assert finish_reasons[-1] in ("stop", "length") and set(finish_reasons[:-1]) <= {None}


@pytest.mark.parametrize("stream", [False, True])
def test_concurrency_8_identical_to_target_only(any_app, target_only, stream: bool) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> list[int]:
        kwargs = dict(model=any_app.config.model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body=EXTRA)
        if not stream:
            return _extra((await client.completions.create(**kwargs)).choices[0], "token_ids")
        token_ids = []
        async for event in await client.completions.create(stream=True, **kwargs):
            token_ids += _extra(event.choices[0], "token_ids")
        return token_ids

    async def all_at_once() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=any_app.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, prompt) for prompt in PROMPTS))

    outputs = asyncio.run(all_at_once())
    for prompt, output in zip(PROMPTS, outputs):
        assert output == target_only.generate(target_only.encode(prompt), MAX_TOKENS), prompt


def test_usage_and_speculative_stats(client, served_app) -> None:
    response = client.completions.create(model=served_app.config.model_name, prompt=PROMPTS[0], max_tokens=16,
                                         temperature=0, extra_body={"ignore_eos": True})
    usage = response.usage
    assert usage.completion_tokens == 16 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = _extra(response, "dspark")
    assert stats["num_steps"] >= 1 and stats["num_draft_tokens"] >= stats["num_accepted_tokens"] >= 0
    assert stats["mean_acceptance_length"] == pytest.approx(1 + stats["num_accepted_tokens"] / stats["num_steps"],
                                                            abs=1e-3)
    assert sum(stats["num_accepted_tokens_per_pos"]) == stats["num_accepted_tokens"]

    events = list(client.completions.create(model=served_app.config.model_name, prompt=PROMPTS[0], max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 16
    assert all(event.usage is None for event in events[:-1])
    assert _extra(events[-1], "dspark") == stats  # same prompt, greedy: same speculation


def test_sse_wire_format_ends_with_done(served_app) -> None:
    body = {"model": served_app.config.model_name, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{served_app.base_url}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_chat_completions(client, served_app, target_only) -> None:
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    template = target_only.tokenizer.chat_template or served_app.config.chat_template
    text = render_chat(target_only.tokenizer, template, [ChatMessage(**m) for m in messages])
    prompt_ids = target_only.tokenizer.encode(text, add_special_tokens=False)
    expected = target_only.generate(prompt_ids, MAX_TOKENS)
    response = client.chat.completions.create(model=served_app.config.model_name, messages=messages,
                                              max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
    message = response.choices[0].message
    assert message.role == "assistant"
    assert _extra(response.choices[0], "token_ids") == expected
    assert message.content == target_only.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(prompt_ids)

    chunks = list(client.chat.completions.create(model=served_app.config.model_name, messages=messages,
                                                 max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content


def test_token_id_prompt_matches_text_prompt(client, served_app, target_only) -> None:
    prompt_ids = target_only.encode(PROMPTS[2])
    by_ids = client.completions.create(model=served_app.config.model_name, prompt=prompt_ids, max_tokens=12,
                                       temperature=0)
    by_text = client.completions.create(model=served_app.config.model_name, prompt=PROMPTS[2], max_tokens=12,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(prompt_ids)


def test_stop_string_cuts_the_output(client, served_app, target_only) -> None:
    prompt = PROMPTS[0]
    full = target_only.tokenizer.decode(target_only.generate(target_only.encode(prompt), MAX_TOKENS),
                                        skip_special_tokens=True)
    stop = next((full[i:i + 3] for i in range(len(full) // 3, len(full) - 3) if full[i:i + 3].strip()), None)
    if stop is None:
        pytest.skip("no usable stop string in this model's output")
    response = client.completions.create(model=served_app.config.model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0, stop=[stop])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client, served_app) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=served_app.config.model_name, prompt=PROMPTS[3], max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed,
                                         extra_body={"top_k": 50, "min_p": 0.01}).choices[0].text
    assert sample(7) == sample(7)


def test_models_and_health(any_app) -> None:
    client = _client(any_app)
    models = client.models.list()
    assert [m.id for m in models.data] == [any_app.config.model_name]
    assert httpx.get(f"{any_app.root_url}/health", timeout=30).json() == {"status": "ok"}


def test_metrics_expose_spec_decode_counters(any_app) -> None:
    client = _client(any_app)
    client.completions.create(model=any_app.config.model_name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    page = httpx.get(f"{any_app.root_url}/metrics", timeout=30).text
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    model = f'model_name="{any_app.config.model_name}"'
    assert values[f"dspark_spec_decode_num_drafts_total{{{model}}}"] > 0
    assert values[f"dspark_spec_decode_num_draft_tokens_total{{{model}}}"] > 0
    assert f"dspark_spec_decode_num_accepted_tokens_total{{{model}}}" in values
    assert any(name.startswith("dspark_spec_decode_num_accepted_tokens_per_pos_total{") for name in values) or \
        values[f"dspark_spec_decode_num_accepted_tokens_total{{{model}}}"] == 0
    assert values[f"dspark_time_to_first_token_seconds_count{{{model}}}"] > 0
    assert values[f"dspark_inter_token_latency_seconds_count{{{model}}}"] > 0
    assert values[f"dspark_generation_tokens_total{{{model}}}"] > 0
