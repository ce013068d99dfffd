"""The router's HTTP behaviour with a scripted model server (no Ray): deadlines, worker errors,
over capacity, and the cancellation of the model-server stream when a request ends early."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.openai_api import RequestRejected
from dspark_ray.serving.protocol import CompletionDelta, SpeculativeStats
from dspark_ray.serving.router import AdmissionGate, Router, build_http_app

MODEL = "dspark-reference"


def token(i: int, finish: str | None = None) -> CompletionDelta:
    stats = SpeculativeStats(2, 4, 2, [2]) if finish else None
    return CompletionDelta("r", [i], f"t{i}", 3, i + 1, finish_reason=finish, stats=stats)


class ScriptedStream:
    """What `handle.options(stream=True).generate.remote(...)` returns: items, pauses and errors."""

    def __init__(self, script: list) -> None:
        self.script, self.cancelled = list(script), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, float):  # a pause, then the next item
            await asyncio.sleep(item)
            return await self.__anext__()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedModel:
    def __init__(self, script: list) -> None:
        self.script, self.streams = script, []
        self.generate = self

    def options(self, stream: bool = False) -> "ScriptedModel":
        return self

    def remote(self, request) -> ScriptedStream:
        self.streams.append(ScriptedStream(self.script))
        return self.streams[-1]


class HealthyRouter(Router):
    def _model_server_healthy(self) -> bool:
        return True


def client_for(script: list, **config) -> tuple[TestClient, ScriptedModel, Router]:
    model = ScriptedModel(script)
    router = HealthyRouter(model, AppConfig(**{"retry_after_s": 3, **config}))
    return TestClient(build_http_app(router)), model, router


def post(client: TestClient, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **fields})


def sse_events(response) -> list:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def test_completion_and_stream_from_deltas() -> None:
    client, model, _ = client_for([token(0), token(1), token(2, "length")])
    body = post(client, return_token_ids=True).json()
    assert body["choices"][0]["text"] == "t0t1t2" and body["choices"][0]["token_ids"] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["dspark"]["num_steps"] == 2 and body["dspark"]["mean_acceptance_length"] == 2.0
    events = sse_events(post(client, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 3
    assert not any(s.cancelled for s in model.streams)  # finished streams are not cancelled


def test_deadline_before_first_token_is_504_and_cancels() -> None:
    client, model, router = client_for([5.0, token(0, "length")], request_timeout_s=0.2)
    response = post(client)
    assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
    assert model.streams[0].cancelled and router.num_in_flight == 0


def test_deadline_mid_stream_is_an_error_event_then_done() -> None:
    client, model, _ = client_for([token(0), 5.0, token(1, "length")], request_timeout_s=0.3)
    response = post(client, stream=True)
    assert response.status_code == 200
    events = sse_events(response)
    assert json.loads(events[0])["choices"][0]["text"] == "t0"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]" and model.streams[0].cancelled


def test_worker_error_is_503_with_retry_after() -> None:
    failed = CompletionDelta("r", [], "", 3, 0, finish_reason="error", error="target rank 1 died")
    client, _, _ = client_for([failed])
    response = post(client)
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "worker_error"
    assert "target rank 1 died" in response.json()["error"]["message"]


def test_worker_error_mid_stream_is_an_error_event_then_done() -> None:
    failed = CompletionDelta("r", [], "", 3, 1, finish_reason="error", error="target rank 1 died")
    client, _, _ = client_for([token(0), failed])
    events = sse_events(post(client, stream=True))
    assert json.loads(events[-2])["error"]["code"] == "worker_error" and events[-1] == "[DONE]"


def test_stream_ending_without_finish_is_503() -> None:
    client, _, _ = client_for([token(0)])
    assert post(client).json()["error"]["code"] == "worker_error"


@pytest.mark.parametrize("status", [429, 503])
def test_serve_backpressure_is_over_capacity(status: int) -> None:
    from ray.serve.exceptions import BackPressureError

    client, _, _ = client_for([BackPressureError(num_queued_requests=1, max_queued_requests=1)],
                              over_capacity_status=status)
    response = post(client)
    assert response.status_code == status and response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "over_capacity"


def test_dead_model_server_is_503() -> None:
    from ray.exceptions import RayActorError

    client, _, _ = client_for([RayActorError()])
    response = post(client)
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"


def test_admission_limit_is_over_capacity() -> None:
    client, model, router = client_for([token(0, "length")], max_ongoing_requests=2, max_queued_requests=1)
    assert router.admission_limit == 3
    router.num_in_flight = 3
    response = post(client)
    assert response.status_code == 429 and response.json()["error"]["code"] == "over_capacity"
    assert not model.streams  # never reached the model server


def test_over_capacity_is_answered_before_the_body_is_read() -> None:
    """A burst past the limit costs no body parsing: even an unparseable body gets the 429."""
    client, model, router = client_for([token(0, "length")], max_ongoing_requests=1, max_queued_requests=1)
    router.num_in_flight = router.admission_limit
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "over_capacity" and not model.streams
    router.num_in_flight = 0
    assert client.post("/v1/completions", content=b"{not json").status_code == 400


@pytest.mark.parametrize(("method", "path", "root_path", "gated"), [
    ("POST", "/v1/completions", "", True), ("POST", "/v1/chat/completions", "", True),
    ("POST", "/api/v1/completions", "/api", True), ("GET", "/v1/completions", "", False),
    ("POST", "/v1/models", "", False)])
def test_admission_gate_answers_over_capacity_before_the_app(method, path, root_path, gated) -> None:
    """Over capacity, a generation request never reaches the FastAPI app; anything else does."""
    router = HealthyRouter(ScriptedModel([]), AppConfig(max_ongoing_requests=1, max_queued_requests=1))
    router.num_in_flight = router.admission_limit
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}
    asyncio.run(AdmissionGate(app, router)(scope, None, send))
    assert (not reached) == gated
    if gated:
        assert sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
        assert json.loads(sent[1]["body"])["error"]["code"] == "over_capacity"


def test_rejected_prompt_keeps_its_status() -> None:
    client, _, _ = client_for([RequestRejected(400, "context_length_exceeded", "too long", "prompt")])
    response = post(client)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_health_and_metrics() -> None:
    client, _, _ = client_for([token(0, "stop")])
    assert client.get("/health").json() == {"status": "ok"}
    post(client)
    page = client.get("/metrics").text
    assert f'dspark_request_success_total{{finished_reason="stop",model_name="{MODEL}"}} 1.0' in page
    assert f'dspark_spec_decode_num_accepted_tokens_per_pos_total{{model_name="{MODEL}",position="0"}} 2.0' in page


def test_health_is_503_when_the_model_server_is_not_healthy() -> None:
    class SickRouter(Router):
        def _model_server_healthy(self) -> bool:
            return False

    client = TestClient(build_http_app(SickRouter(ScriptedModel([]), AppConfig())))
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"


def _error_code(response) -> str:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


def test_body_over_the_limit_is_413_before_parsing() -> None:
    client, model, _ = client_for([token(0, "length")], max_request_body_bytes=1024)
    headers = {"content-type": "application/json"}
    declared = client.post("/v1/completions", content=b"[" * 2000, headers=headers)
    chunked = client.post("/v1/completions", content=iter([b"[" * 600] * 4), headers=headers)  # no Content-Length
    for response in (declared, chunked):
        assert response.status_code == 413 and _error_code(response) == "request_too_large"
    assert not model.streams
    assert post(client).status_code == 200  # under the limit


def test_body_that_arrives_too_slowly_is_408() -> None:
    """Over a real socket: a client that declares 64 bytes and sends 10 gets a 408 within the deadline."""
    model = ScriptedModel([token(0, "length")])
    router = HealthyRouter(model, AppConfig(request_body_timeout_s=0.5))
    server = uvicorn.Server(uvicorn.Config(build_http_app(router), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 64\r\n\r\n" + b'{"model": ')
            began = time.monotonic()
            reply = sock.recv(65536).decode()
            waited = time.monotonic() - began
    finally:
        server.should_exit = True
        thread.join(10)
    assert reply.startswith("HTTP/1.1 408"), reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert 0.4 < waited < 5 and not model.streams


@pytest.mark.parametrize(("raw", "code"), [
    (b"[" * 100_000, "invalid_json"),
    (b'{"model": "dspark-reference", "prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"model": "dspark-reference", "prompt": "x", "top_p": Infinity}', "invalid_json"),
    (b'{"model": "dspark-reference", "prompt": "abc\\ud800def"}', "invalid_unicode"),
    (b'{"model": "dspark-reference", "prompt": "x", "stop": ["\\udc00"]}', "invalid_unicode"),
], ids=["nested", "nan", "infinity", "lone_high_surrogate", "lone_low_surrogate_in_stop"])
def test_hostile_json_is_400(raw: bytes, code: str) -> None:
    client, model, _ = client_for([token(0, "length")])
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and _error_code(response) == code
    assert not model.streams


def test_surrogate_pair_is_text() -> None:
    client, model, _ = client_for([token(0, "length")])
    raw = b'{"model": "dspark-reference", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    assert client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}).status_code == 200
    assert model.streams
