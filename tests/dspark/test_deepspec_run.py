"""`dspark-ray deepspec run` on a tiny target: every stage runs, the trainings take the target from
the dataset's record, eval compares the three drafters with greedy identity, run.json records the
finished stages and a rerun skips them; the trainings get only what the budget leaves after prepare
and the probed calibrate + eval estimate."""

from __future__ import annotations

import json

import pytest

from dspark_ray.cli import main
from dspark_ray.deepspec.pipeline import parse_duration
from dspark_ray.deepspec.run_budget import reserve_seconds

STAGES = ["prepare", "train dspark", "train ablation", "train draft LM", "calibrate", "eval"]


def test_run_chains_every_stage_and_resumes(tiny_targets, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i + 2}"}) + "\n" for i in range(2, 14)))
    command = ["deepspec", "run", "--target", str(tiny_targets("llama").target_dir), "--prompts", str(prompts),
               "--out", str(tmp_path / "run"), "--budget", "15s", "--calibration-prompts", "3", "--eval-prompts", "3",
               "--max-tokens", "8", "--threads", "1"]
    assert main(command) == 0
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(state["done"]) == STAGES
    trainings = sum(float(stage["command"][stage["command"].index("--time-budget-s") + 1])
                    for name, stage in state["done"].items() if name.startswith("train"))
    assert state["reserve"]["probe_seconds_per_prompt"] > 0
    left = 15 - state["done"]["prepare"]["seconds"] - state["reserve"]["estimate_s"]
    assert trainings <= max(3, left + 1.5)  # each training gets at least 1 s; budgets are rounded to 1 s
    out = capsys.readouterr().out
    assert "estimated at" in out and "calibrate + eval took" in out
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["complete"] and {run["name"] for run in results["runs"]} == \
        {"target-only", "dspark", "parallel_only", "draft_lm"}
    assert all(run["identical_to_target_only"] for run in results["runs"] if run["kind"] != "none")
    assert (tmp_path / "run" / "dspark" / "calibration.json").is_file()
    assert main(command) == 0
    assert capsys.readouterr().out.count("done in an earlier run, skipped") == len(STAGES)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1.5h", 5400), ("900s", 900), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_reserve_counts_each_decode():
    one = reserve_seconds(2.0, calibration_prompts=10, eval_prompts=0, num_drafters=3)
    assert reserve_seconds(2.0, calibration_prompts=20, eval_prompts=0, num_drafters=3) == 2 * one
    assert reserve_seconds(2.0, 0, 10, num_drafters=3) > reserve_seconds(2.0, 0, 10, num_drafters=1) > one
