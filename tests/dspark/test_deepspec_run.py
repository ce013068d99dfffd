"""`dspark-ray deepspec run` on a tiny target: every stage runs, the trainings take the target from
the dataset's record, eval compares the three drafters with greedy identity, run.json records the
finished stages and a rerun skips them."""

from __future__ import annotations

import json

import pytest

from dspark_ray.cli import main
from dspark_ray.deepspec.pipeline import parse_duration

STAGES = ["prepare", "train dspark", "train ablation", "train draft LM", "calibrate", "eval"]


def test_run_chains_every_stage_and_resumes(tiny_targets, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i + 2}"}) + "\n" for i in range(2, 14)))
    command = ["deepspec", "run", "--target", str(tiny_targets("llama").target_dir), "--prompts", str(prompts),
               "--out", str(tmp_path / "run"), "--budget", "15s", "--calibration-prompts", "3", "--eval-prompts", "3",
               "--max-tokens", "8", "--threads", "1"]
    assert main(command) == 0
    assert list(json.loads((tmp_path / "run" / "run.json").read_text())["done"]) == STAGES
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["complete"] and {run["name"] for run in results["runs"]} == \
        {"target-only", "dspark", "parallel_only", "draft_lm"}
    assert all(run["identical_to_target_only"] for run in results["runs"] if run["kind"] != "none")
    assert (tmp_path / "run" / "dspark" / "calibration.json").is_file()
    capsys.readouterr()
    assert main(command) == 0
    assert capsys.readouterr().out.count("done in an earlier run, skipped") == len(STAGES)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1.5h", 5400), ("900s", 900), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
