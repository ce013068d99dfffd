"""The ingress: OpenAI-compatible HTTP (FastAPI) and the public gRPC service, in one Serve deployment.

`Router` is a plain class; `dspark_ray.serving.app` wraps it with `serve.ingress()` (the FastAPI
app is built per replica by `__serve_build_asgi_app__`) and `serve.deployment` when the
application is built. It authenticates, validates, applies the per-request deadline and tenant
quotas, streams deltas from a model-server deployment through a DeploymentHandle (colocated: from
the model in its own process, through a `LocalHandle`), and records metrics. Every failure leaves as an OpenAI-style error (a gRPC status on the gRPC side). It knows
nothing about engines or tokenizers; the model server tokenizes and checks prompts.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark_ray.serving import grpc_ingress
from dspark_ray.serving.config import AppConfig, TenantConfig
from dspark_ray.serving.metrics import RouterMetrics
from dspark_ray.serving.openai_api import (SSE_DONE, ApiError, ChatCompletionBody, Completion, CompletionBody,
                                           InferenceRequest, RequestRejected, chat_request, chunk,
                                           completion_request, completion_response, parse_body, request_body_too_slow,
                                           request_too_large,
                                           sse, usage_chunk)
from dspark_ray.serving.protocol import CompletionDelta

ROUTER_DEPLOYMENT = "Router"
MODEL_SERVER_DEPLOYMENT = "ModelServer"
HEALTH_TIMEOUT_S = 10.0


class Router:
    def __init__(self, model: Any, config: AppConfig, grpc_loopback_only: bool = False) -> None:
        """`model`: a DeploymentHandle to the `ServedModel` deployment (or a test double).
        `grpc_loopback_only`: answer gRPC calls from this machine only (HTTP binds a loopback
        address, and Serve's gRPC proxy cannot: see `dspark_ray.serving.exposure`)."""
        self.config = config
        self.grpc_loopback_only = grpc_loopback_only
        self.model = model
        # One streaming handle for all requests: each `.options()` call makes a handle with its own
        # request router, and Serve's max_ongoing_requests is only kept by requests sharing one.
        self._stream = model.options(stream=True)
        self.metrics = RouterMetrics(config.model_name)
        self._tenants = {t.api_key.get_secret_value(): t for t in config.tenants}
        self._tenant_ongoing: Counter[str | None] = Counter()  # None: requests without a tenant
        self._model_info = None
        # Admission control is ours, not Serve's max_queued_requests: Serve counts a request as queued
        # only while it picks a replica, not while a full replica's rejection is on its way back, so
        # its limit lets bursts through. Beyond this many requests in flight, answer over capacity.
        self.admission_limit = config.router_admission_limit
        self.num_in_flight = 0

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    # ---- gRPC methods, named after the rpcs of dspark.v1.InferenceService ----
    async def Generate(self, request, grpc_context=None):  # noqa: N802 (the rpc's name)
        return await grpc_ingress.generate(self, request, grpc_context)

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
        async for response in grpc_ingress.generate_stream(self, request, grpc_context):
            yield response

    # ---- shared by both front ends ----
    def authenticate(self, authorization: str | None) -> TenantConfig | None:
        if not self._tenants:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            for known, tenant in self._tenants.items():
                if hmac.compare_digest(known.encode(), key.strip().encode()):
                    return tenant
        raise ApiError(401, "invalid_api_key", "missing or invalid API key (send 'Authorization: Bearer <key>')")

    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise ApiError(404, "model_not_found", f"the model '{model}' does not exist; this server serves "
                           f"'{self.config.model_name}'", "model")

    async def generate(self, request: InferenceRequest, tenant: TenantConfig | None
                       ) -> AsyncIterator[CompletionDelta]:
        """Deltas of one request; raises ApiError, before the first delta or during the stream.

        Closing the iterator early (client gone) cancels the request on the model server.
        """
        arrival = time.perf_counter()
        timeout_s = self.config.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None  # loop clock
        self.check_admission(tenant)
        self._tenant_ongoing[tenant.name if tenant else None] += 1
        self.num_in_flight += 1
        self.metrics.num_requests_running.labels(self.config.model_name).inc()
        stream, finished = None, False
        try:
            stream = self._stream.generate.remote(request)
            last_token_at = None
            while not finished:
                item = await self._next(stream, deadline)
                if isinstance(item, RequestRejected):
                    raise item.to_error()
                if item.finish_reason in ("error", "abort"):
                    raise ApiError(503, "worker_error", f"the model server failed the request: {item.error}",
                                   headers=self._retry_after())
                now = time.perf_counter()
                if item.token_ids:
                    if last_token_at is None:
                        self.metrics.observe_first_token(now - arrival)
                    else:
                        self.metrics.observe_tokens(now - last_token_at, len(item.token_ids))
                    last_token_at = now
                finished = item.finish_reason is not None
                if finished:
                    self.metrics.observe_finished(item.finish_reason, item.num_prompt_tokens, item.num_output_tokens,
                                                  item.stats, now - arrival)
                yield item
        except ApiError as error:
            self.metrics.observe_error(error.code)
            raise
        finally:
            self.num_in_flight -= 1
            self.metrics.num_requests_running.labels(self.config.model_name).dec()
            self._tenant_ongoing[tenant.name if tenant else None] -= 1
            if stream is not None and not finished:
                stream.cancel()

    async def _next(self, stream, deadline: float | None):
        try:
            async with asyncio.timeout_at(deadline):  # None: no deadline
                return await stream.__anext__()
        except TimeoutError:
            raise ApiError(504, "request_timeout",
                           f"the request did not finish within {self.config.request_timeout_s} s") from None
        except StopAsyncIteration:
            raise ApiError(503, "worker_error", "the model server ended the stream early",
                           headers=self._retry_after()) from None
        except BackPressureError:
            raise self._over_capacity() from None
        except (RayActorError, RayTaskError, DeploymentUnavailableError) as error:
            if isinstance(getattr(error, "cause", None), BackPressureError):
                raise self._over_capacity() from None
            raise ApiError(503, "model_unavailable", f"the model server is unavailable: {type(error).__name__}",
                           headers=self._retry_after()) from None

    def _over_capacity(self) -> ApiError:
        return ApiError(self.config.over_capacity_status, "over_capacity",
                        "the server is over capacity; retry later", headers=self._retry_after())

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    def check_admission(self, tenant: TenantConfig | None) -> None:
        """Raises the over-capacity or tenant-quota rejection a generation would get now.

        `generate` calls it as it admits; `AdmissionGate` also calls it before a
        body is read, so that a burst past the limit costs the router a header lookup per rejection.
        """
        if self.num_in_flight >= self.admission_limit:
            self.metrics.observe_error("over_capacity")
            raise self._over_capacity()
        if tenant is not None and tenant.max_ongoing_requests is not None and \
                self._tenant_ongoing[tenant.name] >= tenant.max_ongoing_requests:
            self.metrics.observe_error("tenant_quota_exceeded")
            raise ApiError(429, "tenant_quota_exceeded",
                           f"tenant '{tenant.name}' already has {tenant.max_ongoing_requests} requests in flight",
                           headers=self._retry_after())

    async def model_info(self):
        if self._model_info is None:
            self._model_info = await self.model.model_info.remote()
        return self._model_info

    async def healthy(self) -> bool:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._model_server_healthy), HEALTH_TIMEOUT_S)
        except Exception:  # no answer about the model server means not ready
            return False

    def _model_server_healthy(self) -> bool:
        """Asks Serve's controller, not the model server: a full model server still answers healthy."""
        from ray import serve

        app = serve.status().applications[serve.get_replica_context().app_name]
        return app.deployments[MODEL_SERVER_DEPLOYMENT].status == "HEALTHY"


# ---- HTTP ----------------------------------------------------------------------------------

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class AdmissionGate:
    """ASGI middleware: a generation request the router would turn away now (a bad API key, over
    capacity, over its tenant's quota) is answered from its headers alone, before FastAPI routes
    it, so that a burst past the limit costs the least Python per rejection. It knows only the
    path, the method and the Authorization header; everything else is left to the routes."""

    def __init__(self, app, router: Router) -> None:
        self.app, self.router = app, router

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and _route(scope) in GENERATION_PATHS:
            try:
                self.router.check_admission(self.router.authenticate(_header(scope, b"authorization")))
            except ApiError as error:
                await JSONResponse(error.body(), error.status, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def build_http_app(router: Router) -> FastAPI:
    api = FastAPI(title="dspark-ray", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(AdmissionGate, router=router)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        body = ApiError(error.status_code, code, str(error.detail)).body()
        return JSONResponse(body, error.status_code, headers=getattr(error, "headers", None))

    @api.get("/health")
    async def health() -> JSONResponse:
        if await router.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse(ApiError(503, "model_unavailable", "no model server answers").body(), 503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        router.authenticate(request.headers.get("authorization"))
        info = await router.model_info()
        return JSONResponse({"object": "list", "data": [{
            "id": info.model_name, "object": "model", "created": 0, "owned_by": "dspark-ray",
            "max_model_len": info.context_limit}]})

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(router, request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(router, request, chat=True)

    return api


async def _serve(router: Router, http_request: Request, chat: bool) -> Response:
    tenant = router.authenticate(http_request.headers.get("authorization"))  # AdmissionGate checked admission
    raw = await read_body(http_request, router.config.max_request_body_bytes, router.config.request_body_timeout_s)
    body = parse_body(raw, ChatCompletionBody if chat else CompletionBody)
    router.check_model(body.model)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    request = chat_request(body, request_id) if chat else completion_request(body, request_id)
    completion = Completion(request_id, body.model, return_token_ids=body.return_token_ids)
    deltas = router.generate(request, tenant)
    try:
        first = await deltas.__anext__()  # errors before the first token keep their HTTP status
    except BaseException:
        await deltas.aclose()
        raise
    if not body.stream:
        try:
            await _collect(completion, first, deltas)
        finally:
            await deltas.aclose()
        return JSONResponse(completion_response(completion, chat))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(_sse_events(completion, first, deltas, chat, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body; a 413 as soon as it is known to pass `limit` bytes (from Content-Length, then as
    read), a 408 when it has not all arrived within `timeout_s` seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise request_too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise request_too_large(limit)
                chunks.append(piece)
    except TimeoutError:
        raise request_body_too_slow(timeout_s) from None
    return b"".join(chunks)


def _absorb(completion: Completion, delta: CompletionDelta) -> None:
    completion.text += delta.text
    completion.token_ids.extend(delta.token_ids)
    completion.num_prompt_tokens = delta.num_prompt_tokens
    if delta.finish_reason is not None:
        completion.finish_reason, completion.stats = delta.finish_reason, delta.stats


async def _collect(completion: Completion, first: CompletionDelta, deltas: AsyncIterator[CompletionDelta]) -> None:
    _absorb(completion, first)
    async for delta in deltas:
        _absorb(completion, delta)


async def _sse_events(completion: Completion, first: CompletionDelta, deltas, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks; an error after the first byte is an error event, then [DONE] as always."""
    try:
        delta, role_sent = first, False
        while True:
            _absorb(completion, delta)
            if delta.text or delta.finish_reason is not None or (completion.return_token_ids and delta.token_ids):
                yield sse(chunk(completion, chat, delta.text, delta.token_ids, delta.finish_reason,
                                first=not role_sent))
                role_sent = True
            if delta.finish_reason is not None:
                break
            delta = await deltas.__anext__()
        if include_usage:
            yield sse(usage_chunk(completion, chat))
    except ApiError as error:
        yield sse(error.body())
    finally:
        await deltas.aclose()
    yield SSE_DONE
