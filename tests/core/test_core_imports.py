"""The core layer is pure torch: importing it must not pull in the serving or model stacks."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import dspark_ray.core

FORBIDDEN = ("ray", "grpc", "fastapi", "pydantic", "transformers")


def test_core_modules_import_no_serving_or_model_libraries():
    modules = ["dspark_ray.core"] + [
        f"dspark_ray.core.{info.name}" for info in pkgutil.iter_modules(dspark_ray.core.__path__)
    ]
    assert {"dspark_ray.core.sampling", "dspark_ray.core.verification"} <= set(modules)
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    repo_root = Path(dspark_ray.core.__file__).resolve().parents[2]
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=repo_root, check=True
    )
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []
