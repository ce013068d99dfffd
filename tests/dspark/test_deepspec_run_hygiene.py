"""What a DeepSpec run tells and leaves behind (issue 26, findings 3, 6 and 7): every prompt of
the file is used, a resumed time budget counts only the new run, the bar and the LR schedule follow
the budget, prepare's progress moves from the first step; a finished run leaves the drafter (no
checkpoint, files readable like the rest) and a model card with only the flags it read."""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
import torch

from dspark_ray.cli import build_parser, main
from dspark_ray.deepspec.prepare import load_prompts
from dspark_ray.deepspec.train import CHECKPOINT_NAME, Schedule, progress_bar

PROMPTS = ["t5 t6 t7", "t9 t10 t11 t12", "t20 t21 t22", "t40 t41"]
TRAIN = ["--block-size", "4", "--hidden-size", "32", "--num-heads", "2", "--head-rank", "8", "--batch-size", "2",
         "--anchors", "2", "--warmup-steps", "1", "--threads", "1", "--features", "online"]
DRAFT_LM = ["--draft-lm", "--draft-hidden-size", "32", "--draft-layers", "1", "--draft-heads", "2",
            "--draft-intermediate-size", "64"]


@pytest.fixture(scope="module")
def data(tiny_targets, tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["deepspec", "prepare", "--out", str(root / "data"), "--target", str(tiny_targets("llama").target_dir),
                 "--prompts", str(prompts), "--max-tokens", "8", "--batch-size", "4", "--threads", "1"]) == 0
    return root / "data"


def test_prepare_uses_every_prompt_of_the_file_unless_told(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(900)))
    parse = build_parser().parse_args
    assert len(load_prompts(parse(["deepspec", "prepare", "--out", "x", "--prompts", str(prompts)]))) == 900
    assert len(load_prompts(parse(["deepspec", "prepare", "--out", "x", "--prompts", str(prompts),
                                   "--num-prompts", "10"]))) == 10


def test_prepare_progress_counts_tokens_from_the_first_step(tiny_targets, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["deepspec", "prepare", "--out", str(tmp_path / "data"), "--target", str(tiny_targets("llama").target_dir),
                 "--prompts", str(prompts), "--max-tokens", "8", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "32/32 [" in err and "tok" in err and "4/4 answers" in err  # 4 answers x 8 tokens


def test_a_resumed_time_budget_counts_only_the_new_run(tiny_targets, data, tmp_path, capsys):
    out = tmp_path / "sliced"
    common = ["deepspec", "train", "--data", str(data), "--out", str(out), *TRAIN, "--steps", "6"]
    assert main([*common, "--stop-after", "2"]) == 0
    state = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    state["elapsed_s"] = 1e6  # the earlier slices took long
    torch.save(state, out / CHECKPOINT_NAME)
    capsys.readouterr()
    assert main([*common, "--resume", "--time-budget-s", "3600"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out


def test_warmup_and_decay_follow_the_time_budget():
    schedule = Schedule(steps=1000, lr=1.0, warmup_steps=30, min_lr_ratio=0.0)
    assert schedule.lr_at(0) == pytest.approx(1 / 30)  # no budget: by steps, as before
    assert schedule.lr_at(0, time_fraction=0.015) == pytest.approx(0.5)  # half the warm-up share of the budget
    assert schedule.lr_at(5, time_fraction=0.515) == pytest.approx(0.5)  # cosine half-way through the rest
    assert schedule.lr_at(5, time_fraction=1.0) == pytest.approx(0.0)


def test_the_progress_bar_shows_the_time_budget():
    args = argparse.Namespace(draft_lm=False, sequential_head="vanilla", steps=100_000, time_budget_s=660.0)
    bar = progress_bar(args, 0)
    assert bar.total == 660 and bar.unit == "s"
    bar.close()


def test_a_finished_run_leaves_the_drafter_and_an_honest_card(data, tmp_path):
    for name, extra, absent in (("dspark", [], "--draft-hidden-size"), ("draft-lm", DRAFT_LM, "--sequential-head")):
        out = tmp_path / name
        assert main(["deepspec", "train", "--data", str(data), "--out", str(out), *TRAIN, *extra, "--steps", "2"]) == 0
        assert not (out / CHECKPOINT_NAME).exists()
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
        umask = os.umask(0)
        os.umask(umask)
        assert set(modes.values()) == {0o666 & ~umask}, modes
        card = (out / "README.md").read_text()
        assert absent not in card and "on CPU, 1 thread\n" in card
    assert "--anchors" not in (tmp_path / "draft-lm" / "README.md").read_text()
