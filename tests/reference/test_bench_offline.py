"""`python -m dspark_ray.bench.offline` on the bundled pair and on a pair it does not know: every
row's greedy output is HF's, the HF assisted sweep really sets HF's draft length, and it runs
without the serving stack (a GPU image has torch and transformers but no Ray)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_ray.bench.offline import Run, RowStats, local_dir, resolve_pair, token_counts
from dspark_ray.config import DEFAULT_DRAFT_DIR, DEFAULT_DSPARK_DIR, DEFAULT_TARGET_DIR

pytestmark = pytest.mark.engine

SCRIPT = """
import sys
for name in ("ray", "fastapi", "starlette", "uvicorn", "openai"):
    sys.modules[name] = None  # importing any of them fails
from dspark_ray.bench.offline import main
sys.exit(main(sys.argv[1:]))
"""


def run_bench(out: Path, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", SCRIPT, "--device", "cpu", "--num-prompts", "1", "--max-tokens", "6",
                           "--repetitions", "1", "--threads", "1", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_offline_bench_without_the_serving_stack(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    run_bench(out, "--hf-assistant-tokens", "1,4")
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert {"hf_generate_greedy", "engine_none", "hf_assisted_defaults", "hf_assisted_k1", "hf_assisted_k4",
            "engine_draft_lm", "engine_dspark", "engine_ngram"} <= set(rows)
    assert all(row["identical_to_hf_greedy"] for row in rows.values())
    assert all(row["runs"][0]["num_tokens"] == 6 for row in rows.values())
    assert rows["hf_assisted_k1"]["mean_acceptance_length"] <= 2.0  # one drafted token: HF took the setting
    assert result["hf_assisted_best_fixed"] in {"hf_assisted_k1", "hf_assisted_k4"}
    assert result["target_decode_ms"] > 0
    assert [line.split(":")[0] for line in result["skipped"]] == ["engine_mtp skipped"]  # no MTP layer shipped
    assert all(row["efficiency"] > 0 for row in rows.values())
    assert rows["hf_assisted_k4"]["draft_ms_per_step"] > 0  # (the engine's policy may not draft in 6 tokens)


def test_a_pair_it_does_not_know_skips_the_drafters_it_was_not_given(tmp_path: Path) -> None:
    target = tmp_path / "target"  # the bundled target under another name: not the bundled target
    target.mkdir()
    for path in DEFAULT_TARGET_DIR.iterdir():
        (target / path.name).symlink_to(path)
    out = tmp_path / "offline.json"
    done = run_bench(out, "--target", str(target), "--draft", str(DEFAULT_DRAFT_DIR), "--hf-assistant-tokens", "2")
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["hf_generate_greedy", "engine_none", "hf_assisted_defaults", "hf_assisted_k2",
                     "engine_draft_lm", "engine_ngram"]
    assert all(row["identical_to_hf_greedy"] for row in result["rows"])
    assert "engine_dspark skipped: no DSpark drafter for this target (--dspark DIR)" in done.stdout


def namespace(**fields) -> argparse.Namespace:
    return argparse.Namespace(**{"target": DEFAULT_TARGET_DIR, "draft": None, "dspark": None,
                                 "dspark_parallel_only": None, **fields})


def test_bundled_drafters_are_defaults_for_the_bundled_target_only(tmp_path: Path) -> None:
    bundled = resolve_pair(namespace())
    assert bundled.draft_lm == DEFAULT_DRAFT_DIR and bundled.dspark["engine_dspark"] == DEFAULT_DSPARK_DIR
    other = resolve_pair(namespace(target=tmp_path))
    assert other.draft_lm is None and other.dspark == {}
    assert len(other.skipped) == 3 and "no draft LM for this target (--draft DIR)" in other.skipped[0]
    given = resolve_pair(namespace(target=tmp_path, dspark=DEFAULT_DSPARK_DIR))
    assert given.dspark == {"engine_dspark": DEFAULT_DSPARK_DIR}


def test_efficiency_is_speedup_over_its_bound() -> None:
    # 10 tokens in 4 steps (L = 2.5); forwards after the prefill: 3 x 20 ms; drafts 4 x 5 ms per step
    run = Run(seconds=1.0, num_tokens=10, num_steps=4, num_accepted_tokens=6, target_forwards=4, target_seconds=0.1,
              prefill_seconds=0.04, num_prefills=1, draft_seconds=0.02)
    stats = RowStats("row", [run])
    assert run.verify_s == pytest.approx(0.02) and run.draft_s == pytest.approx(0.005)
    bound, efficiency = stats.efficiency(speedup=1.5, target_decode_s=0.02)
    assert bound == pytest.approx(2.5 * 0.02 / 0.025) and efficiency == pytest.approx(1.5 / 2.0)
    assert stats.efficiency(1.5, None) == (None, None)


def test_a_hub_id_names_its_snapshot_in_the_hf_cache(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    script = "from dspark_ray.bench.offline import local_dir; print(local_dir('org/tiny'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == snapshot
    assert local_dir(DEFAULT_TARGET_DIR) == DEFAULT_TARGET_DIR and local_dir(None) is None


def test_sweep_counts_are_positive() -> None:
    assert token_counts("1,2, 16") == [1, 2, 16]
    with pytest.raises(argparse.ArgumentTypeError):
        token_counts("0,4")
