"""The public gRPC service (`dspark.v1.InferenceService`) on Ray Serve's gRPC ingress.

Serve's gRPC proxy calls the router's methods named after the rpcs (`Generate`,
`GenerateStream`) with the request message and a `grpc_context`; these functions convert the
message, run it through the same path as HTTP (`Router.generate`) and convert back. Errors
become gRPC status codes; bytes that did not parse arrive as an `UnparsedRequest` and are
INVALID_ARGUMENT. With HTTP on a loopback address, calls from other machines are refused
(PERMISSION_DENIED): Serve's gRPC proxy listens on every interface (`dspark_ray.serving.exposure`).
Generated messages come through `dspark_ray.serving.wire`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from dspark_ray.serving.exposure import peer_is_loopback
from dspark_ray.serving.wire import UnparsedRequest
from dspark_ray.serving.wire import inference_pb2 as pb
from dspark_ray.serving.openai_api import (ApiError, InferenceRequest, request_too_large, sampling_params,
                                           stop_strings)
from dspark_ray.serving.protocol import CompletionDelta

if TYPE_CHECKING:
    from dspark_ray.serving.router import Router

DEFAULT_MAX_TOKENS = 16
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def to_inference_request(message: pb.GenerateRequest, request_id: str) -> InferenceRequest:
    kind = message.WhichOneof("prompt")
    if kind is None:
        raise ApiError(400, "missing_required_parameter", "set prompt: text or token_ids", "prompt")
    text = message.text if kind == "text" else None
    token_ids = list(message.token_ids.ids) if kind == "token_ids" else None
    if text == "" or token_ids == []:
        raise ApiError(400, "empty_prompt", "the prompt must not be empty", "prompt")
    max_tokens = message.max_tokens if message.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise ApiError(400, "invalid_value", "max_tokens must be >= 1", "max_tokens")
    sampling = sampling_params(
        temperature=message.temperature if message.HasField("temperature") else 0.0,
        top_k=message.top_k, top_p=message.top_p if message.HasField("top_p") else 1.0,
        min_p=message.min_p, seed=message.seed if message.HasField("seed") else None)
    return InferenceRequest(request_id, prompt_text=text, prompt_token_ids=token_ids, sampling=sampling,
                            max_tokens=max_tokens, stop=stop_strings(list(message.stop)),
                            ignore_eos=message.ignore_eos)


def _metadata(grpc_context, key: str) -> str | None:
    if grpc_context is None:
        return None
    return dict(grpc_context.invocation_metadata()).get(key)


def _check_peer(router: Router, grpc_context) -> None:
    if router.grpc_loopback_only and grpc_context is not None and not peer_is_loopback(grpc_context.peer()):
        raise ApiError(403, "permission_denied", "this server answers gRPC calls from its own machine only "
                       "(its HTTP proxy binds a loopback address)")


def _start(router: Router, message: pb.GenerateRequest | UnparsedRequest, grpc_context
           ) -> AsyncIterator[CompletionDelta]:
    _check_peer(router, grpc_context)
    tenant = router.authenticate(_metadata(grpc_context, "authorization"))
    if isinstance(message, UnparsedRequest):
        raise ApiError(400, "invalid_message", f"the request is not a dspark.v1.GenerateRequest: {message.error}")
    if message.ByteSize() > router.config.max_request_body_bytes:  # the HTTP body limit, for the same prompts
        raise request_too_large(router.config.max_request_body_bytes)
    if message.model:
        router.check_model(message.model)
    request = to_inference_request(message, f"cmpl-{uuid.uuid4().hex}")
    return router.generate(request, tenant)


def _fail(grpc_context, error: ApiError) -> None:
    """Set the status and raise: Serve keeps a status set before an exception, also in a stream
    that has sent nothing (a status set without raising travels only with a message)."""
    if grpc_context is not None:
        grpc_context.set_code(STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL))
        grpc_context.set_details(f"{error.code}: {error.message}")
    raise error


def _response(delta: CompletionDelta) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=delta.request_id, text=delta.text, token_ids=delta.token_ids,
                                   finish_reason=delta.finish_reason or "")
    if delta.finish_reason is not None:
        response.usage.CopyFrom(pb.Usage(prompt_tokens=delta.num_prompt_tokens,
                                         completion_tokens=delta.num_output_tokens,
                                         total_tokens=delta.num_prompt_tokens + delta.num_output_tokens))
        if delta.stats is not None:
            stats = delta.stats
            response.stats.CopyFrom(pb.SpeculativeStats(
                num_steps=stats.num_steps, num_draft_tokens=stats.num_draft_tokens,
                num_accepted_tokens=stats.num_accepted_tokens,
                mean_acceptance_length=stats.mean_acceptance_length,
                num_accepted_tokens_per_pos=stats.num_accepted_per_position))
    return response


async def generate(router: Router, message: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
    whole = pb.GenerateResponse()
    try:
        deltas = _start(router, message, grpc_context)
        try:
            async for delta in deltas:
                part = _response(delta)
                whole.request_id, whole.finish_reason = part.request_id, part.finish_reason
                whole.text += part.text
                whole.token_ids.extend(part.token_ids)
                if delta.finish_reason is not None:
                    whole.usage.CopyFrom(part.usage)
                    whole.stats.CopyFrom(part.stats)
        finally:
            await deltas.aclose()
    except ApiError as error:
        _fail(grpc_context, error)
    return whole


async def generate_stream(router: Router, message: pb.GenerateRequest, grpc_context
                          ) -> AsyncIterator[pb.GenerateResponse]:
    try:
        deltas = _start(router, message, grpc_context)
        try:
            async for delta in deltas:
                yield _response(delta)
        finally:
            await deltas.aclose()
    except ApiError as error:
        _fail(grpc_context, error)
