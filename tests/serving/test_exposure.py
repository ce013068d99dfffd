"""Who may call the gRPC ingress (no Ray): with HTTP on a loopback address, callers on this machine
only, because Serve's gRPC proxy listens on every interface; and the warning for an endpoint open
beyond this machine without API keys."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dspark_ray.serving.config import AppConfig, TenantConfig
from dspark_ray.serving.exposure import is_loopback, open_endpoint_warning, peer_is_loopback
from dspark_ray.serving.openai_api import ApiError
from dspark_ray.serving.router import Router
from dspark_ray.serving.wire import inference_pb2 as pb


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("fd00::2", False), ("example.com", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("peer", "loopback"), [
    ("ipv4:127.0.0.1:50123", True), ("ipv6:%5B::1%5D:50123", True), ("ipv6:%5B::ffff:127.0.0.1%5D:1", True),
    ("unix:/tmp/socket", True), ("ipv4:192.0.2.7:50123", False), ("ipv6:%5Bfd00::2%5D:50123", False),
    ("", False), ("ipv4:", False), ("vsock:3:1024", False),
])
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert peer_is_loopback(peer) is loopback


def test_serving_beyond_this_machine_without_api_keys_is_warned_about() -> None:
    assert "no tenants" in open_endpoint_warning("0.0.0.0", 0)
    assert open_endpoint_warning("0.0.0.0", 1) is None  # API keys guard it
    assert open_endpoint_warning("127.0.0.1", 0) is None  # local development: no key, as documented


class PeerContext:
    """What Serve hands a gRPC method: the caller's peer and metadata; the status it is given."""

    def __init__(self, peer: str) -> None:
        self._peer, self.code = peer, None

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return ()

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass


class NoModel:
    def options(self, stream: bool = False) -> "NoModel":
        return self


def _generate(router: Router, peer: str) -> grpc.StatusCode | None:
    context = PeerContext(peer)
    with pytest.raises(ApiError):  # refused by peer, or (admitted) by the missing API key
        asyncio.run(router.Generate(pb.GenerateRequest(text="x"), context))
    return context.code


@pytest.mark.parametrize("loopback_only", [True, False])
def test_the_router_refuses_other_machines_while_http_binds_loopback(loopback_only: bool) -> None:
    router = Router(NoModel(), AppConfig(tenants=(TenantConfig(name="a", api_key="a-key-of-8"),)), loopback_only)
    assert _generate(router, "ipv4:127.0.0.1:5000") == grpc.StatusCode.UNAUTHENTICATED
    refused = grpc.StatusCode.PERMISSION_DENIED if loopback_only else grpc.StatusCode.UNAUTHENTICATED
    assert _generate(router, "ipv4:192.0.2.7:5000") == refused
