"""The committed generated code describes exactly the protos in `protos/`.

The check compares what the code means, not its text: the file descriptors protoc builds from the
protos against the ones the committed modules register, and every service method against the
committed stubs and servicers. So a grpcio-tools release that writes another version header (or
reformats its output) never fails it, while an edited proto without `python -m
dspark_ray.serving.protogen` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from dspark_ray.serving import protogen, wire

pytest.importorskip("grpc_tools")

MODULES = {"dspark/v1/inference.proto": (wire.inference_pb2, wire.inference_pb2_grpc),
           "dspark/v1/worker.proto": (wire.worker_pb2, wire.worker_pb2_grpc)}
REGENERATE = "stale generated code: run python -m dspark_ray.serving.protogen"


def _compiled_descriptors(tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = tmp_path / "protos.desc"
    protogen.compile_descriptor_set(out)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for file in files:
        _drop_json_names(file.message_type)
    return {file.name: file for file in files}


def _drop_json_names(messages) -> None:
    """protoc fills json_name (derived from the field name) in descriptor sets, not in Python code."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def _committed_descriptor(module) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def test_every_proto_has_committed_code(tmp_path: Path) -> None:
    assert sorted(_compiled_descriptors(tmp_path)) == sorted(MODULES), REGENERATE


@pytest.mark.parametrize("proto", sorted(MODULES))
def test_committed_messages_match_the_proto(proto: str, tmp_path: Path) -> None:
    messages, _ = MODULES[proto]
    assert _committed_descriptor(messages) == _compiled_descriptors(tmp_path)[proto], REGENERATE


@pytest.mark.parametrize("proto", sorted(MODULES))
def test_committed_services_have_every_method(proto: str) -> None:
    messages, services = MODULES[proto]
    for service in messages.DESCRIPTOR.services_by_name.values():
        stub, servicer = getattr(services, f"{service.name}Stub"), getattr(services, f"{service.name}Servicer")
        assert hasattr(services, f"add_{service.name}Servicer_to_server"), REGENERATE
        for method in service.methods:
            assert hasattr(servicer, method.name), REGENERATE
            assert method.name in stub.__init__.__code__.co_names, REGENERATE


def test_messages_carry_our_module_name() -> None:
    """Serve's gRPC ingress pickles messages: their module must be importable under this name."""
    for messages, _ in MODULES.values():
        for name in messages.DESCRIPTOR.message_types_by_name:
            assert getattr(messages, name).__module__ == messages.__name__


def test_wire_exposes_both_services() -> None:
    assert wire.worker_pb2.DESCRIPTOR.package == "dspark.v1"
    assert hasattr(wire.worker_pb2_grpc, "TargetWorkerStub") and hasattr(wire.worker_pb2_grpc, "DraftWorkerStub")
    assert hasattr(wire.inference_pb2_grpc, "InferenceServiceStub")
