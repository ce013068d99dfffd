"""`python -m dspark_ray.bench.offline` on the bundled pair: every row's greedy output is HF's, and
it runs without the serving stack (a GPU image has torch and transformers but no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
for name in ("ray", "fastapi", "starlette", "uvicorn", "openai"):
    sys.modules[name] = None  # importing any of them fails
from dspark_ray.bench.offline import main
sys.exit(main(sys.argv[1:]))
"""


def test_offline_bench_without_the_serving_stack(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    done = subprocess.run([sys.executable, "-c", SCRIPT, "--device", "cpu", "--num-prompts", "1", "--max-tokens", "6",
                           "--repetitions", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = {row["name"] for row in rows}
    assert {"hf_generate_greedy", "engine_none", "engine_dspark", "engine_ngram"} <= names
    assert all(row["identical_to_hf_greedy"] for row in rows)
    assert all(row["num_tokens"] == 6 for row in rows)
