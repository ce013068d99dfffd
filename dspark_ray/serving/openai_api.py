"""The OpenAI-compatible wire format: request validation, error bodies, response objects.

Requests are pydantic models in strict mode (no "10" for 10, no 1 for true) that forbid unknown
fields; every failure becomes an `ApiError` with OpenAI's body `{"error": {"message", "type",
"param", "code"}}`. Fields OpenAI defines but we do not implement are accepted only at their
neutral value, anything else is a 400 naming the field. This module knows nothing about Ray,
engines or tokenizers: it turns JSON into an `InferenceRequest` and deltas back into JSON.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from dspark_ray.core.sampling import MAX_SEED, MAX_TOP_K, SamplingParams
from dspark_ray.serving.protocol import SpeculativeStats

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON decoding joins valid pairs: what is left is alone

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered with an OpenAI-style body; `code` is always a string."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def __reduce__(self):  # crosses Ray processes (Serve's gRPC error path pickles it)
        return ApiError, (self.status, self.code, self.message, self.param, self.headers)

    @property
    def error_type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request on its way to a model server; the prompt is not tokenized yet.

    Exactly one of `prompt_text`, `prompt_token_ids`, `messages` is set.
    """

    request_id: str
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # None: as many as the context leaves
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class RequestRejected:
    """What a model server yields instead of deltas when the prompt is unusable."""

    status: int
    code: str
    message: str
    param: str | None = None

    def to_error(self) -> ApiError:
        return ApiError(self.status, self.code, self.message, self.param)


# ---- request models ------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


TokenId = StrictInt  # checked against the vocabularies by the model server (negatives too)
Probability = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] = 0  # vLLM's -1 also disables
    min_p: Probability = 0.0
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, StrictFloat] | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False  # vendor extension (vLLM's): decode exactly max_tokens
    return_token_ids: StrictBool = False  # vendor extension (vLLM's): output token ids in each choice


class CompletionBody(SamplingFields):
    prompt: StrictStr | list[TokenId] | list[StrictStr] | list[list[TokenId]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class MessageBody(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class ChatCompletionBody(SamplingFields):
    messages: Annotated[list[MessageBody], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def parse_body(raw: bytes, model: type[SamplingFields]) -> SamplingFields:
    data = load_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    if _has_lone_surrogate(data):
        raise ApiError(400, "invalid_unicode", "the request holds a lone UTF-16 surrogate (e.g. \\ud800), "
                       "which is not text")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body is larger than {limit} bytes")


def request_body_too_slow(timeout_s: float) -> ApiError:
    return ApiError(408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s")


def load_json(raw: bytes) -> Any:
    """Strict JSON (RFC 8259: no NaN or Infinity) as Python objects; any failure is a 400."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {error}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _has_lone_surrogate(data: Any) -> bool:
    """Whether any string (key or value) in parsed JSON holds a lone surrogate; no recursion."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _validation_error(error: ValidationError) -> ApiError:
    details = error.errors(include_url=False)
    # A union reports one error per branch; the first names the field well enough.
    first = details[0]
    loc = [str(part) for part in first["loc"] if not _is_union_branch(part)]
    param = ".".join(loc) or None
    kind = first["type"]
    if kind == "missing":
        return ApiError(400, "missing_required_parameter", f"missing required parameter '{param}'", param)
    if kind == "extra_forbidden":
        return ApiError(400, "unknown_parameter", f"unrecognized request argument supplied: '{param}'", param)
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "value_error", "literal_error", "enum"}:
        return ApiError(400, "invalid_value", f"invalid value for '{param}': {first['msg']}", param)
    return ApiError(400, "invalid_type", f"invalid type for '{param}': {first['msg']}", param)


def _is_union_branch(part: Any) -> bool:
    # pydantic names union branches like 'str', 'list[int]', 'constrained-int', 'function-after[...]'
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or "-" in part)


# ---- turning a body into an InferenceRequest ----------------------------------------------

def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, param)


def _check_common(body: SamplingFields) -> None:
    if body.n != 1:
        raise _unsupported("n", "only n=1 is supported; send several requests for several completions")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "invalid_value", "stream_options is only allowed when stream is true", "stream_options")
    if body.presence_penalty != 0.0 or body.frequency_penalty != 0.0:
        param = "presence_penalty" if body.presence_penalty != 0.0 else "frequency_penalty"
        raise _unsupported(param, f"{param} is not supported (it would change the target's distribution)")
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is not supported")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, "invalid_value", f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "invalid_value", "stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, "invalid_value", f"stop strings are at most {MAX_STOP_CHARS} characters long", "stop")
    return tuple(stops)


def sampling_params(**fields: Any) -> SamplingParams:
    """`SamplingParams(**fields)`; its ValueError (which starts with the field's name) is a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        raise ApiError(400, "invalid_value", str(error), name if name in fields else None) from None


def _sampling(body: SamplingFields) -> SamplingParams:
    return sampling_params(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                           min_p=body.min_p, seed=body.seed)


def completion_request(body: CompletionBody, request_id: str) -> InferenceRequest:
    _check_common(body)
    if body.logprobs is not None:
        raise _unsupported("logprobs", "logprobs are not supported yet")
    if body.echo:
        raise _unsupported("echo", "echo is not supported")
    if body.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported")
    if body.suffix:
        raise _unsupported("suffix", "suffix is not supported")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _unsupported("prompt", "batched prompts are not supported: send one prompt per request")
        prompt = prompt[0]
    text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
    if (text is not None and text == "") or (token_ids is not None and not token_ids):
        raise ApiError(400, "empty_prompt", "the prompt must not be empty", "prompt")
    return InferenceRequest(request_id, prompt_text=text, prompt_token_ids=token_ids, sampling=_sampling(body),
                            max_tokens=body.max_tokens, stop=stop_strings(body.stop), ignore_eos=body.ignore_eos)


def chat_request(body: ChatCompletionBody, request_id: str) -> InferenceRequest:
    _check_common(body)
    if body.logprobs or body.top_logprobs is not None:
        raise _unsupported("logprobs", "logprobs are not supported yet")
    if body.tools:
        raise _unsupported("tools", "tool calling is not supported")
    if body.response_format not in (None, {"type": "text"}):
        raise _unsupported("response_format", "only response_format {'type': 'text'} is supported")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "invalid_value", "set max_tokens or max_completion_tokens, not both", "max_tokens")
    messages = tuple(ChatMessage(m.role, m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
                     for m in body.messages)
    return InferenceRequest(request_id, messages=messages, sampling=_sampling(body),
                            max_tokens=body.max_tokens or body.max_completion_tokens,
                            stop=stop_strings(body.stop), ignore_eos=body.ignore_eos)


# ---- response objects ----------------------------------------------------------------------

@dataclass
class Completion:
    """The pieces of one completion gathered from its deltas."""

    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    stats: SpeculativeStats | None = None
    return_token_ids: bool = False

    def usage(self) -> dict[str, int]:
        completion_tokens = len(self.token_ids)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.num_prompt_tokens + completion_tokens}


def vendor_stats(stats: SpeculativeStats | None) -> dict[str, Any]:
    stats = stats or SpeculativeStats()
    return {"num_steps": stats.num_steps, "num_draft_tokens": stats.num_draft_tokens,
            "num_accepted_tokens": stats.num_accepted_tokens,
            "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
            "num_accepted_tokens_per_pos": list(stats.num_accepted_per_position)}


def completion_response(c: Completion, chat: bool) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason}
    else:
        choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    if c.return_token_ids:
        choice["token_ids"] = list(c.token_ids)
    return {"id": c.request_id, "object": "chat.completion" if chat else "text_completion", "created": c.created,
            "model": c.model, "choices": [choice], "usage": c.usage(), "dspark": vendor_stats(c.stats)}


def chunk(c: Completion, chat: bool, text: str, token_ids: list[int], finish_reason: str | None,
          first: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if c.return_token_ids:
        choice["token_ids"] = list(token_ids)
    body = {"id": c.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": c.created, "model": c.model, "choices": [choice]}
    if finish_reason is not None:
        body["dspark"] = vendor_stats(c.stats)
    return body


def usage_chunk(c: Completion, chat: bool) -> dict[str, Any]:
    return {"id": c.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": c.created, "model": c.model, "choices": [], "usage": c.usage(), "dspark": vendor_stats(c.stats)}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
