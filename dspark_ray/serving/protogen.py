"""Generate the Python gRPC code for `protos/dspark/v1/*.proto` into `dspark_ray/serving/generated/`.

Run `python -m dspark_ray.serving.protogen` after editing a proto (needs grpcio-tools, a dev
dependency). The output is committed and never edited by hand; `tests/serving/test_protos_in_sync.py`
fails when what it describes drifts from the protos (the generator's version header may differ). Import generated modules through `dspark_ray.serving.wire`.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_ROOT = Path(__file__).resolve().parent / "generated"
PACKAGE = "dspark_ray.serving.generated"


def _protoc(*outputs: str) -> None:
    from grpc_tools import protoc

    protos = [str(p.relative_to(PROTO_ROOT)) for p in sorted(PROTO_ROOT.rglob("*.proto"))]
    if protoc.main(["protoc", f"-I{PROTO_ROOT}", *outputs, *protos]) != 0:
        raise RuntimeError("protoc failed")


def compile_descriptor_set(out_file: Path) -> None:
    """Write the protos' FileDescriptorSet, what the generated modules must register."""
    _protoc(f"--descriptor_set_out={out_file}")


def generate(out_dir: Path) -> list[Path]:
    _protoc(f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}")
    outputs = sorted(p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"})
    for path in outputs:  # generated modules import each other by proto package: make it ours
        text = re.sub(r"^from dspark\.v1 import", f"from {PACKAGE}.dspark.v1 import", path.read_text(), flags=re.M)
        # Messages carry this module name; pickling them (Serve's gRPC ingress does) needs the real one.
        text = text.replace("(DESCRIPTOR, 'dspark.v1.", f"(DESCRIPTOR, '{PACKAGE}.dspark.v1.")
        path.write_text(text)
    for package_dir in {out_dir, *(p.parent for p in outputs)}:
        (package_dir / "__init__.py").touch()
    return outputs


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for path in Path(tmp).rglob("*"):
            if path.is_file():
                target = GENERATED_ROOT / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    print(f"generated into {GENERATED_ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
