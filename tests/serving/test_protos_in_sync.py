"""The committed generated code is exactly what `python -m dspark_ray.serving.protogen` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspark_ray.serving import protogen

pytest.importorskip("grpc_tools")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    expected, committed = _files(tmp_path), _files(protogen.GENERATED_ROOT)
    assert sorted(committed) == sorted(expected), "generated files differ: run python -m dspark_ray.serving.protogen"
    stale = [name for name in expected if committed[name] != expected[name]]
    assert not stale, f"stale generated code {stale}: run python -m dspark_ray.serving.protogen"


def test_wire_exposes_both_services() -> None:
    from dspark_ray.serving import wire

    assert wire.worker_pb2.DESCRIPTOR.package == "dspark.v1"
    assert hasattr(wire.worker_pb2_grpc, "TargetWorkerStub") and hasattr(wire.worker_pb2_grpc, "DraftWorkerStub")
    assert hasattr(wire.inference_pb2_grpc, "InferenceServiceStub")
