"""The install is reproducible and its version floors are true.

CI installs with `.ci/constraints-cpu.txt` (written by `.ci/lock`), so every dependency must be
pinned there. The committed generated gRPC code refuses to import below the grpcio and protobuf
versions it was generated for, so pyproject's floors must be at least those.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dspark_ray.serving import protogen

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GENERATED = protogen.GENERATED_ROOT / "dspark" / "v1"


def _requirements() -> list[Requirement]:
    extras = PROJECT["optional-dependencies"]
    return [Requirement(line) for line in [*PROJECT["dependencies"], *extras["dev"], *extras["plot"]]]


def _floor(name: str) -> Version:
    for requirement in _requirements():
        if canonicalize_name(requirement.name) == name:
            return min(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
    raise AssertionError(f"{name} is not a dependency")


def test_the_lock_pins_every_dependency() -> None:
    lock = (REPO / ".ci" / "constraints-cpu.txt").read_text()
    pinned = {canonicalize_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, flags=re.M)}
    missing = [r.name for r in _requirements() if canonicalize_name(r.name) not in pinned]
    assert not missing, f"not in the lock: {missing}; run .ci/lock"


def test_grpcio_floor_covers_the_generated_code() -> None:
    for path in GENERATED.glob("*_pb2_grpc.py"):
        generated_for = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", path.read_text()).group(1))
        assert _floor("grpcio") >= generated_for, path.name


def test_protobuf_floor_covers_the_generated_code() -> None:
    for path in GENERATED.glob("*_pb2.py"):
        numbers = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text()).groups()
        assert _floor("protobuf") >= Version(".".join(numbers)), path.name


# Dependencies the package needs without importing them, and why.
NEEDED_UNIMPORTED = {"accelerate": "transformers refuses tp_plan (tensor-parallel loading) without it"}


def test_no_dependency_goes_unused() -> None:
    """Every runtime dependency is imported somewhere in the package, or says why it is needed."""
    import_names = {"grpcio": "grpc", "prometheus-client": "prometheus_client", "pyyaml": "yaml",
                    "protobuf": "google.protobuf"}
    sources = "\n".join(p.read_text() for p in (REPO / "dspark_ray").rglob("*.py"))
    for requirement in map(Requirement, PROJECT["dependencies"]):
        if canonicalize_name(requirement.name) in NEEDED_UNIMPORTED:
            continue
        module = import_names.get(canonicalize_name(requirement.name), canonicalize_name(requirement.name))
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, flags=re.M), requirement.name
