"""Every worker RPC refuses calls without the deployment's credential, or with another one, and the
worker servers listen on the node address alone. First the servers on their own (no Ray, no models):
every service and method of worker.proto, read from its descriptors, so a new RPC is covered; then
the live workers of a distributed engine."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
import ray.util

from conftest import greedy_requests, outputs
from dspark_ray.serving.distributed.credential import METADATA_KEY, authenticated_channel, new_secret
from dspark_ray.serving.distributed.server import GRPC_OPTIONS, start_server
from dspark_ray.serving.wire import worker_pb2 as pb
from dspark_ray.serving.wire import worker_pb2_grpc as pb_grpc

SERVICES = list(pb.DESCRIPTOR.services_by_name.values())
RPCS = [pytest.param(service, method, id=f"{service.name}.{method.name}")
        for service in SERVICES for method in service.methods]
WRONG_CREDENTIALS = {
    "none": (),
    "wrong": ((METADATA_KEY, new_secret()),),
    "empty": ((METADATA_KEY, ""),),
    "as-bearer": (("authorization", "Bearer {secret}"),),  # the right secret, not where workers read it
}


class HealthyDraft(pb_grpc.DraftWorkerServicer):
    def Health(self, request, context):  # noqa: N802 (the rpc's name)
        return pb.HealthResponse(role="draft", world_size=1)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, dict[str, str]]]:
    """(secret, service name -> address): one server per service, its generated servicer
    (UNIMPLEMENTED everywhere) except the draft worker's Health."""
    secret = new_secret()
    started = {}
    for service in SERVICES:
        servicer = HealthyDraft() if service.name == "DraftWorker" else getattr(pb_grpc, f"{service.name}Servicer")()
        started[service.name] = start_server(getattr(pb_grpc, f"add_{service.name}Servicer_to_server"), servicer,
                                             "127.0.0.1", secret)
    yield secret, {name: address for name, (_, address) in started.items()}
    for server, _ in started.values():
        server.stop(grace=None)


def _call_code(address: str, service, method, metadata, request=None) -> grpc.StatusCode:
    """The status of one call of `method` (an empty request unless given) with `metadata`."""
    request_type = getattr(pb, method.input_type.name)
    response_type = getattr(pb, method.output_type.name)
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        rpc = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                  request_serializer=request_type.SerializeToString,
                                  response_deserializer=response_type.FromString)
        try:
            rpc(request or request_type(), metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("credential", list(WRONG_CREDENTIALS))
@pytest.mark.parametrize(("service", "method"), RPCS)
def test_a_call_without_the_credential_is_refused(servers, service, method, credential: str) -> None:
    secret, addresses = servers
    metadata = tuple((key, value.format(secret=secret)) for key, value in WRONG_CREDENTIALS[credential])
    assert _call_code(addresses[service.name], service, method, metadata) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("service", "method"), RPCS)
def test_a_call_with_the_credential_reaches_the_servicer(servers, service, method) -> None:
    secret, addresses = servers
    code = _call_code(addresses[service.name], service, method, ((METADATA_KEY, secret),))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)


def test_the_coordinators_channel_carries_the_credential(servers) -> None:
    secret, addresses = servers
    with authenticated_channel(addresses["DraftWorker"], secret, GRPC_OPTIONS) as channel:
        assert pb_grpc.DraftWorkerStub(channel).Health(pb.HealthRequest(), timeout=30).role == "draft"


def test_a_server_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        start_server(pb_grpc.add_DraftWorkerServicer_to_server, HealthyDraft(), "127.0.0.1", "")


def accepts_on_loopback(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a server on every interface does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_server_listens_on_the_node_address_alone() -> None:
    host = ray.util.get_node_ip_address()
    if host.startswith("127."):
        pytest.skip("the node address is a loopback address: nothing to tell apart")
    server, address = start_server(pb_grpc.add_DraftWorkerServicer_to_server, HealthyDraft(), host, new_secret())
    try:
        assert address.rsplit(":", 1)[0].strip("[]") == host
        assert not accepts_on_loopback(int(address.rsplit(":", 1)[1]))
    finally:
        server.stop(grace=None)


def test_live_workers_refuse_strangers_and_listen_on_the_node_address(distributed_engines) -> None:
    engine, _, _ = distributed_engines("llama", "model", tp=1, tp_sharding="auto")
    node_host = ray.util.get_node_ip_address()
    for handle, service_name in ((engine.target, "TargetWorker"), (engine.draft, "DraftWorker")):
        service = pb.DESCRIPTOR.services_by_name[service_name]
        for method in service.methods:
            assert _call_code(handle.address, service, method, ()) == grpc.StatusCode.UNAUTHENTICATED
        host, port = handle.address.rsplit(":", 1)
        assert host.strip("[]") == node_host
        if not node_host.startswith("127."):
            assert not accepts_on_loopback(int(port))
        stub, _ = handle.current()
        assert stub.Health(pb.HealthRequest(), timeout=30).role == handle.role


def test_a_strangers_remove_fails_no_open_sequence(distributed_engines, local_outputs) -> None:
    """Finding 3 of issue 22: one unauthenticated Remove(seq_ids 0..4095) failed every open stream."""
    engine, _, config = distributed_engines("llama", "model", tp=1, tp_sharding="auto")
    requests = greedy_requests()
    seqs = [engine.add_request(request) for request in requests]
    engine.step()
    everything = pb.RemoveRequest(seq_ids=range(4096))
    for handle, service_name in ((engine.target, "TargetWorker"), (engine.draft, "DraftWorker")):
        service = pb.DESCRIPTOR.services_by_name[service_name]
        code = _call_code(handle.address, service, service.methods_by_name["Remove"], (), everything)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    while engine.has_unfinished():
        engine.step()
    assert outputs(seqs) == local_outputs(config, requests)
