"""Serve's gRPC ingress with the public proto, called with a real grpc client."""

from __future__ import annotations

import grpc
import pytest

from dspark_ray.serving.wire import inference_pb2 as pb
from dspark_ray.serving.wire import inference_pb2_grpc as pb_grpc

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stub(served_app):
    with grpc.insecure_channel(served_app.grpc_target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def _metadata(app) -> tuple[tuple[str, str], ...]:
    return (("application", app.name),)  # several Serve apps run in the session


def test_unary_generate_is_target_only_greedy(stub, any_app, target_only) -> None:
    prompt_ids = target_only.encode(PROMPT)
    response = stub.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=MAX_TOKENS), metadata=_metadata(any_app),
                             timeout=120)
    expected = target_only.generate(prompt_ids, MAX_TOKENS)
    assert list(response.token_ids) == expected
    assert response.text == target_only.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(expected)
    assert response.stats.num_steps >= 1
    assert response.stats.mean_acceptance_length >= 1.0


def test_streaming_generate_matches_unary(stub, any_app, target_only) -> None:
    prompt_ids = target_only.encode(PROMPT)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), max_tokens=MAX_TOKENS)
    parts = list(stub.GenerateStream(request, metadata=_metadata(any_app), timeout=120))
    assert len(parts) >= 2
    assert [p.token_ids for p in parts if p.token_ids]  # tokens arrive over several messages
    token_ids = [t for part in parts for t in part.token_ids]
    assert token_ids == target_only.generate(prompt_ids, MAX_TOKENS)
    assert all(not p.finish_reason for p in parts[:-1]) and parts[-1].finish_reason
    assert parts[-1].usage.completion_tokens == len(token_ids)


@pytest.mark.parametrize(("request_fields", "status"), [
    ({"text": PROMPT, "model": "gpt-4"}, grpc.StatusCode.NOT_FOUND),
    ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"text": PROMPT, "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"text": PROMPT, "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"token_ids": pb.TokenIds(ids=[10**8])}, grpc.StatusCode.INVALID_ARGUMENT),
], ids=["unknown_model", "empty_prompt", "no_prompt", "negative_temperature", "zero_max_tokens", "out_of_vocab"])
def test_errors_are_grpc_status_codes(stub, served_app, request_fields, status) -> None:
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as raised:
            call(pb.GenerateRequest(**request_fields), metadata=_metadata(served_app), timeout=60)
        assert raised.value.code() == status, raised.value.details()


def test_calls_from_another_address_are_refused_while_http_binds_loopback(served_app) -> None:
    """Serve's gRPC proxy listens on every interface; the router admits the callers HTTP can have."""
    import ray.util

    from dspark_ray.serving.exposure import is_loopback

    node_host = ray.util.get_node_ip_address()
    if is_loopback(node_host):
        pytest.skip("the node address is a loopback address: no other caller to tell apart")
    port = served_app.grpc_target.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"{node_host}:{port}") as channel:  # the caller is node_host, not loopback
        stub = pb_grpc.InferenceServiceStub(channel)
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as raised:
                call(pb.GenerateRequest(text=PROMPT, max_tokens=MAX_TOKENS), metadata=_metadata(served_app), timeout=60)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
