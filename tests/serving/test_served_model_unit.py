"""`ServedModel` on the bundled tokenizer with a scripted engine runner (no Ray, no engine): prompts
surely past the context are rejected untokenized, prompts the tokenizer refuses are a 400, and
tokenizing happens off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from serving_helpers import ScriptedRunner

from dspark_ray.config import EngineConfig
from dspark_ray.serving import served_model
from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.openai_api import ChatMessage, InferenceRequest, RequestRejected
from dspark_ray.serving.served_model import ServedModel


@pytest.fixture
def served(monkeypatch, model_dirs) -> ServedModel:
    monkeypatch.setattr(served_model, "engine_runner", lambda config: ScriptedRunner())
    return ServedModel(AppConfig(engine=EngineConfig(target=model_dirs.target, draft=model_dirs.draft)))


def _rejection(result) -> tuple[int, str, str | None]:
    assert isinstance(result, RequestRejected), result
    return result.status, result.code, result.param


def test_text_the_tokenizer_refuses_is_invalid_prompt(served) -> None:
    result = served.prepare(InferenceRequest("r", prompt_text="abc\ud800def"))
    assert _rejection(result) == (400, "invalid_prompt", "prompt")


def test_prompt_surely_past_the_context_is_not_tokenized(served, monkeypatch) -> None:
    monkeypatch.setattr(served.tokenizer, "encode", lambda *args, **kwargs: pytest.fail("tokenized"))
    text = "a" * (served.max_prompt_chars + 1)
    assert _rejection(served.prepare(InferenceRequest("r", prompt_text=text))) == (
        400, "context_length_exceeded", "prompt")
    for role in ("user", "system", "assistant"):  # whatever the role, the rendered chat is bounded
        chat = InferenceRequest("r", messages=(ChatMessage(role, text), ChatMessage("user", "x")))
        assert _rejection(served.prepare(chat)) == (400, "context_length_exceeded", "messages")


def test_prompt_within_the_bound_is_tokenized_off_the_event_loop(served, monkeypatch) -> None:
    threads = []
    encode = served.tokenizer.encode
    monkeypatch.setattr(served.tokenizer, "encode",
                        lambda *args, **kwargs: threads.append(threading.current_thread()) or encode(*args, **kwargs))

    async def first_item():
        return await anext(served.generate(InferenceRequest("r", prompt_text="a b " * 200)))

    assert _rejection(asyncio.run(first_item())) == (400, "context_length_exceeded", "prompt")
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
