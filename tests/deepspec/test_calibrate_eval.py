"""`dspark-ray deepspec calibrate` and `eval` (and `dspark-ray profile`) end to end on a tiny random
target with a random DSpark drafter, plus the acceptance bookkeeping they share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dspark_ray.cli import main
from dspark_ray.deepspec.acceptance import StepRecord, acceptance_records, summarize
from dspark_ray.deepspec.calibrate import split_prompts
from dspark_ray.deepspec.evaluate import DrafterSpec
from dspark_ray.dspark.config import DSparkConfig
from dspark_ray.dspark.io import new_dspark_model, save_dspark
from dspark_ray.dspark.signature import target_signature

pytestmark = pytest.mark.engine

VOCAB = 64
BLOCK = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(target dir with tokenizer, random DSpark drafter dir, prompts JSONL)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deepspec")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).eval()
    target.save_pretrained(root / "target")
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t1", pad_token="t0").save_pretrained(root / "target")
    drafter = DSparkConfig(target=target_signature(target), target_layer_ids=(0, 1), block_size=BLOCK, hidden_size=32,
                           num_layers=1, num_heads=2, intermediate_size=64, head_rank=8)
    save_dspark(new_dspark_model(drafter, target), root / "dspark")
    prompts = [" ".join(f"t{(7 * i + j) % (VOCAB - 2) + 2}" for j in range(3 + i % 4)) for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return root / "target", root / "dspark", root / "prompts.jsonl"


def test_calibrate_profile_and_eval_end_to_end(pair, tmp_path: Path, capsys):
    target, dspark, prompts = pair
    assert main(["deepspec", "calibrate", "--draft", str(dspark), "--target", str(target), "--prompts", str(prompts),
                 "--max-tokens", "12", "--batch-size", "4"]) == 0
    calibration = json.loads((dspark / "calibration.json").read_text())
    assert len(calibration["temperatures"]) == BLOCK
    assert calibration["heldout"]["num_steps"] > 0 and calibration["fit"]["num_pairs"] > 0
    assert "ECE of survival probabilities" in capsys.readouterr().out

    assert main(["profile", "--target", str(target), "--max-tokens-per-batch", "16", "--context-length", "16",
                 "--repeats", "2"]) == 0
    assert (target.parent / "target_profile.json").is_file()

    out = tmp_path / "eval"
    assert main(["deepspec", "eval", "--target", str(target), "--drafters", f"dspark={dspark}:dspark", "ngram=ngram",
                 "--prompts", str(prompts), "--num-prompts", "4", "--max-tokens", "10",
                 "--num-speculative-tokens", str(BLOCK), "--batch-sizes", "1", "3",
                 "--schedules", "fixed", "confidence", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    rows = {(run["name"], run["schedule"], run["batch_size"]) for run in runs}
    assert rows == {(name, schedule, batch) for batch in (1, 3) for name, schedule in
                    [("target-only", "fixed"), ("dspark", "fixed"), ("dspark", "confidence"), ("ngram", "fixed")]}
    assert all(run["identical_to_target_only"] for run in runs if run["kind"] != "none")
    dspark_fixed = next(run for run in runs if run["name"] == "dspark" and run["schedule"] == "fixed")
    assert dspark_fixed["calibration"]["ece_raw"] >= 0 and "ece_calibrated" in dspark_fixed["calibration"]
    assert len(dspark_fixed["survival_per_position"]) == BLOCK
    for name in ("results.md", "acceptance.png", "speedup.png", "reliability_dspark.png"):
        assert (out / name).is_file()
    assert "| dspark | dspark | confidence | 3 |" in (out / "results.md").read_text()


def test_errors_are_reported_not_raised(pair, tmp_path: Path, capsys):
    target, dspark, _ = pair
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["deepspec", "calibrate", "--draft", str(dspark), "--target", str(target), "--prompts", str(empty)]) == 2
    assert main(["deepspec", "eval", "--target", str(target), "--drafters", f"d={dspark}:dspark",
                 "--prompts", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("dspark=/a/b:dspark", DrafterSpec("dspark", "dspark", Path("/a/b"))),
    ("lm=C:/models/x:model", DrafterSpec("lm", "model", Path("C:/models/x"))),
    ("ngram=ngram", DrafterSpec("ngram", "ngram", None)),
    ("lookup=:ngram", DrafterSpec("lookup", "ngram", None)),
])
def test_drafter_specs(text, expected):
    assert DrafterSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["dspark", "=x:dspark", "a=/x:eagle", "a=dspark", "a=:model"])
def test_bad_drafter_specs(text):
    with pytest.raises(argparse.ArgumentTypeError):
        DrafterSpec.parse(text)


def test_summary_counts_acceptance_by_position():
    steps = [StepRecord(0, 3, 3, [1.0, 1.0, 1.0]), StepRecord(0, 3, 1, [1.0, 0.0, 0.0]),
             StepRecord(1, 2, 0, [0.0, 0.0]), StepRecord(1, 0, 0, None)]
    summary = summarize(steps)
    assert summary.num_steps == 4 and summary.num_draft_tokens == 8 and summary.num_accepted_tokens == 4
    assert summary.mean_acceptance_length == pytest.approx(2.0)
    assert summary.drafted_per_position == [3, 3, 2]
    assert summary.survival_per_position == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert summary.conditional_per_position == pytest.approx([2 / 3, 1 / 2, 1.0])
    records = acceptance_records(steps)
    assert records.num_steps == 3 and records.num_draft_tokens.tolist() == [3, 3, 2]


def test_prompt_split_is_seeded_and_keeps_a_fit_part():
    prompts = [(str(i), f"p{i}") for i in range(10)]
    fit, heldout = split_prompts(prompts, 0.3, seed=0)
    assert len(heldout) == 3 and sorted(fit + heldout) == sorted(prompts)
    assert split_prompts(prompts, 0.3, seed=0) == (fit, heldout)
    assert split_prompts(prompts[:1], 0.5, seed=0) == (prompts[:1], [])
    assert split_prompts(prompts, 0.0, seed=0) == (prompts, [])


def test_calibrate_claims_a_target_only_when_asked_and_met(pair, tmp_path: Path, capsys):
    target, dspark, prompts = pair
    common = ["deepspec", "calibrate", "--draft", str(dspark), "--target", str(target), "--prompts", str(prompts),
              "--max-tokens", "12", "--batch-size", "4", "--out", str(tmp_path / "calibration.json")]
    assert main(common) == 0
    assert "meets" not in capsys.readouterr().out  # no target asked for: no verdict
    assert main([*common, "--target-ece", "0"]) == 1
    out = capsys.readouterr().out
    assert "MISSES the target <= 0.0" in out and "meets" not in out
    assert main([*common, "--heldout-fraction", "0"]) == 2  # nothing to check the fit on
    assert "held-out prompts" in capsys.readouterr().err


def test_eval_writes_each_run_as_it_finishes(pair, tmp_path: Path, monkeypatch):
    from dspark_ray.deepspec import evaluate

    target, dspark, prompts = pair
    calls = []

    def interrupted(engine, requests, progress=None):
        calls.append(progress)
        if len(calls) == 4:  # the two warm-ups, target-only, then the drafter's run is cut
            raise KeyboardInterrupt
        return run_recorded(engine, requests, progress=progress)

    run_recorded = evaluate.run_recorded
    monkeypatch.setattr(evaluate, "run_recorded", interrupted)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        main(["deepspec", "eval", "--target", str(target), "--drafters", f"dspark={dspark}:dspark",
              "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "6", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and [run["name"] for run in results["runs"]] == ["target-only"]
    assert "partial" in (out / "results.md").read_text()
