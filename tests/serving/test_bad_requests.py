"""Malformed requests against a real Serve app: each gets its status and an OpenAI-style error body
with a string `code`; the server stays healthy after all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from serving_helpers import ALICE_KEY
from transformers import AutoConfig

MODEL = "dspark-reference"
VOCAB = "<vocab>"  # placeholders filled from the served models
CONTEXT = "<context>"


@dataclass(frozen=True)
class Case:
    id: str
    body: Any  # a dict is sent as JSON, bytes as they are
    status: int
    code: str
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None


def completion(**fields) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, **fields}


def chat(**fields) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


CASES = [
    # the body itself
    Case("bad_json", b'{"model": ', 400, "invalid_json"),
    Case("empty_body", b"", 400, "invalid_json"),
    Case("body_is_array", b"[]", 400, "invalid_request"),
    Case("body_is_string", b'"hello"', 400, "invalid_request"),
    Case("missing_model", {"prompt": "x"}, 400, "missing_required_parameter", param="model"),
    Case("missing_prompt", {"model": MODEL}, 400, "missing_required_parameter", param="prompt"),
    Case("unknown_field", completion(foo=1), 400, "unknown_parameter", param="foo"),
    Case("unknown_model", completion(model="gpt-4"), 404, "model_not_found", param="model"),
    Case("model_not_a_string", completion(model=123), 400, "invalid_type", param="model"),
    # wrong types
    Case("max_tokens_string", completion(max_tokens="10"), 400, "invalid_type", param="max_tokens"),
    Case("max_tokens_float", completion(max_tokens=1.5), 400, "invalid_type", param="max_tokens"),
    Case("temperature_string", completion(temperature="hot"), 400, "invalid_type", param="temperature"),
    Case("top_k_float", completion(top_k=1.5), 400, "invalid_type", param="top_k"),
    Case("seed_string", completion(seed="x"), 400, "invalid_type", param="seed"),
    Case("stream_string", completion(stream="yes"), 400, "invalid_type", param="stream"),
    Case("ignore_eos_string", completion(ignore_eos="true"), 400, "invalid_type", param="ignore_eos"),
    Case("stop_number", completion(stop=5), 400, "invalid_type", param="stop"),
    Case("prompt_mixed_list", completion(prompt=[1, "a"]), 400, "invalid_type", param="prompt"),
    # out-of-range values
    Case("max_tokens_zero", completion(max_tokens=0), 400, "invalid_value", param="max_tokens"),
    Case("max_tokens_negative", completion(max_tokens=-5), 400, "invalid_value", param="max_tokens"),
    Case("temperature_negative", completion(temperature=-0.1), 400, "invalid_value", param="temperature"),
    Case("temperature_too_high", completion(temperature=2.5), 400, "invalid_value", param="temperature"),
    Case("top_p_zero", completion(top_p=0.0), 400, "invalid_value", param="top_p"),
    Case("top_p_above_one", completion(top_p=1.5), 400, "invalid_value", param="top_p"),
    Case("top_k_negative", completion(top_k=-2), 400, "invalid_value", param="top_k"),
    Case("min_p_above_one", completion(min_p=1.5), 400, "invalid_value", param="min_p"),
    Case("seed_negative", completion(seed=-1), 400, "invalid_value", param="seed"),
    Case("seed_too_large", completion(seed=2**70), 400, "invalid_value", param="seed"),
    Case("n_zero", completion(n=0), 400, "invalid_value", param="n"),
    Case("stream_options_without_stream", completion(stream_options={"include_usage": True}), 400,
         "invalid_value", param="stream_options"),
    Case("too_many_stops", completion(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", param="stop"),
    Case("empty_stop", completion(stop=[""]), 400, "invalid_value", param="stop"),
    # prompts the model cannot take
    Case("empty_prompt", completion(prompt=""), 400, "empty_prompt", param="prompt"),
    Case("empty_token_list", completion(prompt=[]), 400, "empty_prompt", param="prompt"),
    Case("token_id_past_vocab", completion(prompt=[1, VOCAB]), 400, "token_id_out_of_vocabulary", param="prompt"),
    Case("token_id_negative", completion(prompt=[-1]), 400, "token_id_out_of_vocabulary", param="prompt"),
    Case("prompt_fills_context", completion(prompt=[CONTEXT]), 400, "context_length_exceeded",
         param="prompt"),
    Case("max_tokens_past_context", completion(max_tokens=CONTEXT), 400, "context_length_exceeded",
         param="max_tokens"),
    # valid OpenAI fields we do not implement
    Case("n_two", completion(n=2), 400, "unsupported_parameter", param="n"),
    Case("logprobs", completion(logprobs=1), 400, "unsupported_parameter", param="logprobs"),
    Case("echo", completion(echo=True), 400, "unsupported_parameter", param="echo"),
    Case("best_of", completion(best_of=3), 400, "unsupported_parameter", param="best_of"),
    Case("presence_penalty", completion(presence_penalty=0.5), 400, "unsupported_parameter", param="presence_penalty"),
    Case("logit_bias", completion(logit_bias={"1": 5.0}), 400, "unsupported_parameter", param="logit_bias"),
    Case("batched_prompts", completion(prompt=["a", "b"]), 400, "unsupported_parameter", param="prompt"),
    # chat
    Case("chat_missing_messages", {"model": MODEL}, 400, "missing_required_parameter", "/v1/chat/completions",
         param="messages"),
    Case("chat_empty_messages", chat(messages=[]), 400, "invalid_value", "/v1/chat/completions", param="messages"),
    Case("chat_unknown_role", chat(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_value",
         "/v1/chat/completions", param="messages.0.role"),
    Case("chat_content_number", chat(messages=[{"role": "user", "content": 5}]), 400, "invalid_type",
         "/v1/chat/completions", param="messages.0.content"),
    Case("chat_logprobs", chat(logprobs=True), 400, "unsupported_parameter", "/v1/chat/completions",
         param="logprobs"),
    Case("chat_tools", chat(tools=[{"type": "function"}]), 400, "unsupported_parameter", "/v1/chat/completions",
         param="tools"),
    Case("chat_both_max_tokens", chat(max_completion_tokens=4), 400, "invalid_value", "/v1/chat/completions",
         param="max_tokens"),
    Case("chat_n_two", chat(n=2), 400, "unsupported_parameter", "/v1/chat/completions", param="n"),
    # routes and methods
    Case("get_on_completions", None, 405, "method_not_allowed", method="GET"),
    Case("unknown_route", completion(), 404, "not_found", "/v1/engines"),
]


@pytest.fixture(scope="module")
def limits(served_app, model_dirs) -> dict[str, int]:
    vocab = min(AutoConfig.from_pretrained(d, local_files_only=True).vocab_size
                for d in (model_dirs.target, model_dirs.draft))
    context = httpx.get(f"{served_app.base_url}/models", timeout=30).json()["data"][0]["max_model_len"]
    return {VOCAB: vocab, CONTEXT: context}


def _fill(value: Any, limits: dict[str, int]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, limits) for k, v in value.items()}
    if isinstance(value, list):
        if value == [CONTEXT]:
            return [1] * limits[CONTEXT]
        return [_fill(v, limits) for v in value]
    return limits.get(value, value) if isinstance(value, str) else value


def _send(root_url: str, case: Case, limits: dict[str, int]) -> httpx.Response:
    content = case.body if isinstance(case.body, bytes) else (
        None if case.body is None else json.dumps(_fill(case.body, limits)).encode())
    headers = {"content-type": "application/json", **case.headers}
    return httpx.request(case.method, f"{root_url}{case.path}", content=content, headers=headers, timeout=60)


def _check_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and isinstance(error["code"], str), error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request(served_app, limits, case: Case) -> None:
    _check_error(_send(served_app.root_url, case, limits), case.status, case.code, case.param)


def test_enough_cases() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


AUTH_CASES = [
    Case("no_api_key", completion(model="tiny"), 401, "invalid_api_key"),
    Case("wrong_api_key", completion(model="tiny"), 401, "invalid_api_key",
         headers={"authorization": "Bearer sk-wrong-000000"}),
    Case("basic_scheme", completion(model="tiny"), 401, "invalid_api_key",
         headers={"authorization": f"Basic {ALICE_KEY}"}),
    Case("models_without_key", None, 401, "invalid_api_key", "/v1/models", method="GET"),
    Case("good_key_unknown_model", completion(), 404, "model_not_found",
         headers={"authorization": f"Bearer {ALICE_KEY}"}),
]


@pytest.mark.parametrize("case", AUTH_CASES, ids=[c.id for c in AUTH_CASES])
def test_api_keys(tiny_app, case: Case) -> None:
    _check_error(_send(tiny_app.root_url, case, {}), case.status, case.code, case.param)


def test_healthy_after_bad_requests(served_app, limits) -> None:
    for case in CASES[:10]:
        _send(served_app.root_url, case, limits)
    assert httpx.get(f"{served_app.root_url}/health", timeout=30).json() == {"status": "ok"}
    response = httpx.post(f"{served_app.base_url}/completions", json=completion(temperature=0), timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    assert served_app.wait_until_idle() == 0
