"""Malformed and hostile requests against a real Serve app, over /v1/completions, /v1/chat/completions
and the gRPC ingress: each gets its 4xx and an OpenAI-style error body with a string `code` (a gRPC
status and `code: message` details), never a 5xx; a few edge values are documented 2xx. After all of
them the server is healthy and greedy output is still the target's alone."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from serving_helpers import ALICE_KEY
from transformers import AutoConfig

from dspark_ray.core.sampling import MAX_SEED, MAX_TOP_K, MIN_TEMPERATURE
from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.openai_api import MAX_STOP_CHARS
from dspark_ray.serving.wire import inference_pb2 as pb
from dspark_ray.serving.wire import inference_pb2_grpc as pb_grpc

MODEL = "dspark-reference"
VOCAB = "<vocab>"  # placeholders filled from the served models
CONTEXT = "<context>"
CHAT = "/v1/chat/completions"
BODY_LIMIT = AppConfig().max_request_body_bytes  # the session's apps keep the default
OVER_LIMIT = b" " * (10 * 2**20)  # 10 MB of JSON whitespace: no parser needs to see it
LONG_TEXT = "ab " * (BODY_LIMIT // 4)  # under the body limit, far past the context in any tokenizer


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
    chunked: bool = False  # send the bytes without a Content-Length


def completion(**fields) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, **fields}


def raw(fields: bytes) -> bytes:
    """A completion body written by hand: `fields` follow the model name as they are."""
    return b'{"model": "dspark-reference", ' + fields + b"}"


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

# Regression cases of issue 22 and more of the same kind.
HOSTILE_CASES = [
    # finding 1: top_k the engine's tensors or the worker protocol's int32 cannot hold
    Case("top_k_2_63", completion(top_k=2**63), 400, "invalid_value", param="top_k"),
    Case("top_k_10_12", completion(top_k=10**12), 400, "invalid_value", param="top_k"),
    Case("top_k_uint32_max", completion(top_k=2**32 - 1), 400, "invalid_value", param="top_k"),
    Case("top_k_int32_overflow", completion(top_k=MAX_TOP_K + 1), 400, "invalid_value", param="top_k"),
    Case("top_k_very_negative", completion(top_k=-(2**63)), 400, "invalid_value", param="top_k"),
    Case("top_k_bool", completion(top_k=True), 400, "invalid_type", param="top_k"),
    Case("top_k_string", completion(top_k="5"), 400, "invalid_type", param="top_k"),
    Case("chat_top_k_2_63", chat(top_k=2**63), 400, "invalid_value", CHAT, param="top_k"),
    Case("chat_top_k_uint32_max", chat(top_k=2**32 - 1), 400, "invalid_value", CHAT, param="top_k"),
    # floats that would make the step's probabilities NaN
    Case("temperature_denormal", completion(temperature=1e-40), 400, "invalid_value", param="temperature"),
    Case("temperature_tiny", completion(temperature=5e-324), 400, "invalid_value", param="temperature"),
    Case("temperature_under_min", completion(temperature=MIN_TEMPERATURE / 2), 400, "invalid_value",
         param="temperature"),
    Case("top_p_float32_zero", completion(top_p=1e-320), 400, "invalid_value", param="top_p"),
    Case("temperature_overflow", raw(b'"prompt": "x", "temperature": 1e999'), 400, "invalid_value",
         param="temperature"),
    Case("temperature_null", completion(temperature=None), 400, "invalid_type", param="temperature"),
    Case("temperature_nan_string", completion(temperature="NaN"), 400, "invalid_type", param="temperature"),
    Case("min_p_negative", completion(min_p=-0.5), 400, "invalid_value", param="min_p"),
    Case("frequency_penalty_too_high", completion(frequency_penalty=3.0), 400, "invalid_value",
         param="frequency_penalty"),
    Case("chat_temperature_denormal", chat(temperature=1e-40), 400, "invalid_value", CHAT, param="temperature"),
    Case("chat_top_p_float32_zero", chat(top_p=1e-320), 400, "invalid_value", CHAT, param="top_p"),
    # integers past what the engine and torch.Generator take
    Case("seed_2_63", completion(seed=2**63), 400, "invalid_value", param="seed"),
    Case("seed_2_64", completion(seed=2**64), 400, "invalid_value", param="seed"),
    Case("seed_float", completion(seed=1.0), 400, "invalid_type", param="seed"),
    Case("max_tokens_huge", completion(max_tokens=10**30), 400, "context_length_exceeded", param="max_tokens"),
    Case("max_tokens_2_63", completion(max_tokens=2**63), 400, "context_length_exceeded", param="max_tokens"),
    Case("max_tokens_bool", completion(max_tokens=True), 400, "invalid_type", param="max_tokens"),
    Case("n_huge", completion(n=2**64), 400, "unsupported_parameter", param="n"),
    Case("best_of_zero", completion(best_of=0), 400, "invalid_value", param="best_of"),
    Case("logprobs_too_many", completion(logprobs=21), 400, "invalid_value", param="logprobs"),
    Case("chat_max_completion_tokens_zero", chat(max_tokens=None, max_completion_tokens=0), 400, "invalid_value",
         CHAT, param="max_completion_tokens"),
    Case("chat_top_logprobs_too_many", chat(top_logprobs=50), 400, "invalid_value", CHAT, param="top_logprobs"),
    Case("chat_n_huge", chat(n=10**20), 400, "unsupported_parameter", CHAT, param="n"),
    Case("chat_seed_2_64", chat(seed=2**64), 400, "invalid_value", CHAT, param="seed"),
    # token ids outside either vocabulary or any integer type
    Case("token_id_2_63", completion(prompt=[2**63]), 400, "token_id_out_of_vocabulary", param="prompt"),
    Case("token_id_uint32_max", completion(prompt=[1, 2**32 - 1]), 400, "token_id_out_of_vocabulary",
         param="prompt"),
    Case("token_id_bignum", completion(prompt=[10**40]), 400, "token_id_out_of_vocabulary", param="prompt"),
    Case("token_id_float", completion(prompt=[1.0]), 400, "invalid_type", param="prompt"),
    Case("token_id_bool", completion(prompt=[True]), 400, "invalid_type", param="prompt"),
    Case("token_lists_batched", completion(prompt=[[1], [2]]), 400, "unsupported_parameter", param="prompt"),
    Case("token_list_nested_empty", completion(prompt=[[]]), 400, "empty_prompt", param="prompt"),
    # stop strings
    Case("stop_too_long", completion(stop="x" * (MAX_STOP_CHARS + 1)), 400, "invalid_value", param="stop"),
    Case("stop_list_too_long", completion(stop=["a", "y" * (MAX_STOP_CHARS + 1)]), 400, "invalid_value",
         param="stop"),
    Case("stop_many", completion(stop=["s"] * 1000), 400, "invalid_value", param="stop"),
    Case("stop_nested", completion(stop=[["a"]]), 400, "invalid_type", param="stop"),
    Case("chat_stop_too_long", chat(stop="x" * (MAX_STOP_CHARS + 1)), 400, "invalid_value", CHAT, param="stop"),
    Case("chat_empty_stop", chat(stop=""), 400, "invalid_value", CHAT, param="stop"),
    # finding 6: text that is not text, JSON that is not JSON
    Case("lone_high_surrogate", raw(b'"prompt": "abc\\ud800def"'), 400, "invalid_unicode"),
    Case("lone_low_surrogate", raw(b'"prompt": "\\udc00"'), 400, "invalid_unicode"),
    Case("reversed_surrogate_pair", raw(b'"prompt": "\\ude00\\ud83d"'), 400, "invalid_unicode"),
    Case("surrogate_in_stop", raw(b'"prompt": "x", "stop": "\\ud800"'), 400, "invalid_unicode"),
    Case("surrogate_in_key", raw(b'"prompt": "x", "\\ud800": 1'), 400, "invalid_unicode"),
    Case("surrogate_in_user", raw(b'"prompt": "x", "user": "\\udbff"'), 400, "invalid_unicode"),
    Case("utf8_encoded_surrogate", raw(b'"prompt": "a\xed\xa0\x80b"'), 400, "invalid_unicode"),
    Case("chat_lone_surrogate", raw(b'"messages": [{"role": "user", "content": "abc\\ud800def"}]'), 400,
         "invalid_unicode", CHAT),
    Case("chat_surrogate_in_part", raw(b'"messages": [{"role": "user", "content": [{"type": "text", '
         b'"text": "\\udfff"}]}]'), 400, "invalid_unicode", CHAT),
    Case("invalid_utf8", raw(b'"prompt": "\xff\xfe"'), 400, "invalid_json"),
    Case("nested_arrays_100k", b"[" * 100_000, 400, "invalid_json"),
    Case("nested_objects_100k", b'{"a":' * 100_000, 400, "invalid_json"),
    Case("nested_closed_100k", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    Case("chat_nested_arrays_100k", b"[" * 100_000, 400, "invalid_json", CHAT),
    Case("nested_prompt_500", raw(b'"prompt": ' + b"[" * 500 + b"]" * 500), 400, "invalid_type", param="prompt"),
    Case("nan_literal", raw(b'"prompt": "x", "temperature": NaN'), 400, "invalid_json"),
    Case("infinity_literal", raw(b'"prompt": "x", "top_p": Infinity'), 400, "invalid_json"),
    Case("minus_infinity_literal", raw(b'"prompt": "x", "min_p": -Infinity'), 400, "invalid_json"),
    Case("chat_nan_literal", raw(b'"messages": [], "temperature": NaN'), 400, "invalid_json", CHAT),
    Case("integer_5000_digits", raw(b'"prompt": "x", "max_tokens": 1' + b"0" * 5000), 400, "invalid_json"),
    Case("trailing_garbage", b'{"model": "dspark-reference", "prompt": "x"} x', 400, "invalid_json"),
    Case("two_objects", b'{"model": "dspark-reference"}{"prompt": "x"}', 400, "invalid_json"),
    Case("single_quotes", b"{'model': 'dspark-reference', 'prompt': 'x'}", 400, "invalid_json"),
    Case("nul_bytes", b"\x00" * 64, 400, "invalid_json"),
    Case("body_null", b"null", 400, "invalid_request"),
    Case("body_number", b"1", 400, "invalid_request"),
    Case("body_true", b"true", 400, "invalid_request"),
    Case("chat_body_array", b"[]", 400, "invalid_request", CHAT),
    Case("chat_bad_json", b'{"messages": [', 400, "invalid_json", CHAT),
    Case("chat_content_part_image", chat(messages=[{"role": "user", "content": [{"type": "image_url",
         "image_url": {"url": "x"}}]}]), 400, "invalid_type", CHAT),
    Case("chat_tool_role", chat(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_value", CHAT,
         param="messages.0.role"),
    Case("chat_message_not_object", chat(messages=["hi"]), 400, "invalid_type", CHAT),
    Case("chat_message_extra_field", chat(messages=[{"role": "user", "content": "x", "foo": 1}]), 400,
         "unknown_parameter", CHAT),
    Case("chat_unknown_field", chat(foo=1), 400, "unknown_parameter", CHAT, param="foo"),
    Case("chat_unknown_model", chat(model="gpt-4"), 404, "model_not_found", CHAT, param="model"),
    # finding 2: bounded work before admission
    Case("body_10mb", OVER_LIMIT, 413, "request_too_large"),
    Case("body_10mb_chunked", OVER_LIMIT, 413, "request_too_large", chunked=True),
    Case("chat_body_10mb", OVER_LIMIT, 413, "request_too_large", CHAT),
    Case("chat_body_10mb_chunked", OVER_LIMIT, 413, "request_too_large", CHAT, chunked=True),
    Case("prompt_past_context_untokenized", completion(prompt=LONG_TEXT), 400, "context_length_exceeded",
         param="prompt"),
    Case("chat_past_context_untokenized", chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400,
         "context_length_exceeded", CHAT, param="messages"),
    Case("token_ids_past_context", completion(prompt=[1] * 100_000), 400, "context_length_exceeded",
         param="prompt"),
    Case("prompt_past_context_tokenized", completion(prompt="a " * 3000), 400, "context_length_exceeded",
         param="prompt"),
    # headers and methods
    Case("chat_get", None, 405, "method_not_allowed", CHAT, method="GET"),
    Case("put_on_completions", completion(), 405, "method_not_allowed", method="PUT"),
    Case("delete_on_chat", None, 405, "method_not_allowed", CHAT, method="DELETE"),
    Case("text_plain_body", b"hello", 400, "invalid_json", headers={"content-type": "text/plain"}),
]

# Edge values that are valid: answered 200 with a completion.
ACCEPTED = [
    Case("top_k_int32_max", completion(top_k=MAX_TOP_K), 200, ""),
    Case("top_k_minus_one", completion(top_k=-1), 200, ""),
    Case("seed_int64_max", completion(seed=MAX_SEED, temperature=1.0), 200, ""),
    Case("temperature_min", completion(temperature=MIN_TEMPERATURE), 200, ""),
    Case("stop_longest", completion(stop="x" * MAX_STOP_CHARS), 200, ""),
    Case("surrogate_pair", raw(b'"prompt": "smile \\ud83d\\ude00", "max_tokens": 2'), 200, ""),
    Case("utf8_bom", b'\xef\xbb\xbf{"model": "dspark-reference", "prompt": "x", "max_tokens": 2}', 200, ""),
    Case("chat_top_k_int32_max", chat(top_k=MAX_TOP_K), 200, "", CHAT),
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
    if case.chunked:
        content = iter([content[i:i + 2**16] for i in range(0, len(content), 2**16)])
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


@pytest.mark.parametrize("case", CASES + HOSTILE_CASES, ids=[c.id for c in CASES + HOSTILE_CASES])
def test_bad_request(served_app, limits, case: Case) -> None:
    _check_error(_send(served_app.root_url, case, limits), case.status, case.code, case.param)


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_edge_values_are_accepted(served_app, limits, case: Case) -> None:
    response = _send(served_app.root_url, case, limits)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


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


@dataclass(frozen=True)
class GrpcCase:
    id: str
    fields: dict[str, Any]  # pb.GenerateRequest fields; bytes: a serialized request as it is
    status: grpc.StatusCode
    code: str  # the error code the details start with


def _raw_request(text: bytes) -> bytes:
    """A GenerateRequest whose `text` holds bytes no protobuf library would serialize (length < 128)."""
    return bytes([0x12, len(text)]) + text


INVALID = grpc.StatusCode.INVALID_ARGUMENT
GRPC_CASES = [
    # finding 1 over gRPC: top_k is a uint32 on the wire, an int32 between workers
    GrpcCase("top_k_uint32_max", {"text": "x", "top_k": 2**32 - 1}, INVALID, "invalid_value"),
    GrpcCase("top_k_int32_overflow", {"text": "x", "top_k": MAX_TOP_K + 1}, INVALID, "invalid_value"),
    GrpcCase("temperature_nan", {"text": "x", "temperature": float("nan")}, INVALID, "invalid_value"),
    GrpcCase("temperature_inf", {"text": "x", "temperature": float("inf")}, INVALID, "invalid_value"),
    GrpcCase("temperature_denormal", {"text": "x", "temperature": 1e-40}, INVALID, "invalid_value"),
    GrpcCase("top_p_nan", {"text": "x", "temperature": 1.0, "top_p": float("nan")}, INVALID, "invalid_value"),
    GrpcCase("top_p_zero", {"text": "x", "top_p": 0.0}, INVALID, "invalid_value"),
    GrpcCase("top_p_denormal", {"text": "x", "top_p": 1e-45}, INVALID, "invalid_value"),
    GrpcCase("top_p_above_one", {"text": "x", "top_p": 1.5}, INVALID, "invalid_value"),
    GrpcCase("min_p_nan", {"text": "x", "min_p": float("nan")}, INVALID, "invalid_value"),
    GrpcCase("min_p_negative", {"text": "x", "min_p": -0.5}, INVALID, "invalid_value"),
    GrpcCase("seed_negative", {"text": "x", "seed": -1}, INVALID, "invalid_value"),
    GrpcCase("seed_int64_min", {"text": "x", "seed": -(2**63)}, INVALID, "invalid_value"),
    GrpcCase("max_tokens_uint32_max", {"text": "x", "max_tokens": 2**32 - 1}, INVALID, "context_length_exceeded"),
    GrpcCase("token_id_uint32_max", {"token_ids": pb.TokenIds(ids=[1, 2**32 - 1])}, INVALID,
             "token_id_out_of_vocabulary"),
    GrpcCase("token_ids_past_context", {"token_ids": pb.TokenIds(ids=[1] * 100_000)}, INVALID,
             "context_length_exceeded"),
    GrpcCase("too_many_stops", {"text": "x", "stop": ["a"] * 5}, INVALID, "invalid_value"),
    GrpcCase("empty_stop", {"text": "x", "stop": [""]}, INVALID, "invalid_value"),
    GrpcCase("stop_too_long", {"text": "x", "stop": ["x" * (MAX_STOP_CHARS + 1)]}, INVALID, "invalid_value"),
    GrpcCase("text_past_context_untokenized", {"text": LONG_TEXT[:3 * 2**20]}, INVALID, "context_length_exceeded"),
    GrpcCase("text_past_context_tokenized", {"text": "a " * 3000}, INVALID, "context_length_exceeded"),
    GrpcCase("empty_token_ids", {"token_ids": pb.TokenIds(ids=[])}, INVALID, "empty_prompt"),
    GrpcCase("unknown_model", {"text": "x", "model": "gpt-4"}, grpc.StatusCode.NOT_FOUND, "model_not_found"),
    # bytes that are not a GenerateRequest
    GrpcCase("text_invalid_utf8", _raw_request(b"\xff\xfe"), INVALID, "invalid_message"),
    GrpcCase("text_encoded_surrogate", _raw_request(b"a\xed\xa0\x80b"), INVALID, "invalid_message"),
    GrpcCase("truncated_message", b"\x12\x7fabc", INVALID, "invalid_message"),
    GrpcCase("wrong_wire_type_is_an_unknown_field", b"\x15\x00\x00\x00\x00", INVALID, "missing_required_parameter"),
    GrpcCase("message_over_the_body_limit", {"text": "x" * (BODY_LIMIT + 1)}, grpc.StatusCode.RESOURCE_EXHAUSTED,
             "request_too_large"),
]


@pytest.fixture(scope="module")
def channel(served_app):
    with grpc.insecure_channel(served_app.grpc_target) as channel:
        yield channel


def _grpc_calls(channel):
    """Unary and streaming Generate, each taking serialized request bytes."""
    path = "/dspark.v1.InferenceService/"
    unary = channel.unary_unary(path + "Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    stream = channel.unary_stream(path + "GenerateStream", request_serializer=None,
                                  response_deserializer=pb.GenerateResponse.FromString)
    return unary, lambda raw, **kw: list(stream(raw, **kw))


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.id for c in GRPC_CASES])
def test_grpc_bad_request(channel, served_app, case: GrpcCase) -> None:
    raw = case.fields if isinstance(case.fields, bytes) else pb.GenerateRequest(**case.fields).SerializeToString()
    for call in _grpc_calls(channel):
        with pytest.raises(grpc.RpcError) as raised:
            call(raw, metadata=(("application", served_app.name),), timeout=60)
        assert raised.value.code() == case.status, raised.value.details()
        assert raised.value.details().startswith(f"{case.code}: "), raised.value.details()


def test_enough_cases() -> None:
    cases = CASES + HOSTILE_CASES + ACCEPTED + AUTH_CASES
    assert len({c.id for c in cases}) == len(cases) and len({c.id for c in GRPC_CASES}) == len(GRPC_CASES)
    assert len(cases) + len(GRPC_CASES) >= 120


def test_large_bodies_during_open_streams(served_app, target_only) -> None:
    """A 10 MB body, an over-long prompt and a long chat to tokenize arrive while 4 greedy streams are
    open: each gets its 4xx, and the 4 streams finish identical to the target alone."""
    prompts = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]
    max_tokens = 32
    long_chat = chat(messages=[{"role": "system", "content": "ab " * 2**16}] * 16 + [{"role": "user", "content": "x"}])

    async def stream(client: httpx.AsyncClient, prompt: str, opened: asyncio.Event) -> list[int]:
        token_ids = []
        body = completion(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, return_token_ids=True)
        async with client.stream("POST", "/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    token_ids += json.loads(line[len("data: "):])["choices"][0].get("token_ids", [])
                    opened.set()
        return token_ids

    async def hostile(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.post("/completions", content=OVER_LIMIT, headers={"content-type": "application/json"}),
                await client.post("/completions", json=completion(prompt=LONG_TEXT)),
                await client.post("/chat/completions", json=long_chat)]

    async def run() -> tuple[list[list[int]], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=served_app.base_url, timeout=120) as client:
            opened = [asyncio.Event() for _ in prompts]
            streams = [asyncio.create_task(stream(client, p, e)) for p, e in zip(prompts, opened)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 120)
            responses = await hostile(client)
            return await asyncio.gather(*streams), responses

    outputs, responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [413, 400, 400], [r.text for r in responses]
    assert [r.json()["error"]["code"] for r in responses] == ["request_too_large"] + ["context_length_exceeded"] * 2
    for prompt, output in zip(prompts, outputs):
        assert output == target_only.generate(target_only.encode(prompt), max_tokens), prompt
    assert served_app.wait_until_idle() == 0


def test_healthy_and_lossless_after_hostile_requests(served_app, target_only) -> None:
    """Runs last in this module: after every case above, the server answers and decodes as before."""
    assert httpx.get(f"{served_app.root_url}/health", timeout=30).json() == {"status": "ok"}
    prompt = "def fibonacci(n):"
    response = httpx.post(f"{served_app.base_url}/completions", timeout=60,
                          json=completion(prompt=prompt, temperature=0, max_tokens=16, return_token_ids=True))
    assert response.status_code == 200, response.text
    expected = target_only.generate(target_only.encode(prompt), 16)
    assert response.json()["choices"][0]["token_ids"] == expected
    assert served_app.wait_until_idle() == 0
