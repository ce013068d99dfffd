"""DeepSpec end to end on a tiny target: prepare (resumable, answers = the target's own greedy
output, optional feature cache) -> train a few steps (checkpoint, resume to identical weights) ->
the result loads as a DSpark drafter for that target; the draft-LM mode writes an HF directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_ray.cli import main
from dspark_ray.deepspec.records import read_records
from dspark_ray.dspark.io import load_dspark
from dspark_ray.engine.loading import load_causal_lm
from tiny_models import greedy_reference

PROMPTS = ["t5 t6 t7", "t9 t10 t11 t12", "t3", "t20 t21 t22 t23 t24 t25", "t40 t41", "t50 t51 t52"]
TRAIN = ["--block-size", "4", "--hidden-size", "32", "--num-heads", "2", "--head-rank", "8", "--batch-size", "3",
         "--anchors", "4", "--lr", "1e-2", "--warmup-steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def prepared(tiny_targets, tmp_path_factory):
    models = tiny_targets("llama")
    root = tmp_path_factory.mktemp("deepspec")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    data = root / "data"
    common = ["deepspec", "prepare", "--out", str(data), "--target", str(models.target_dir), "--prompts", str(prompts),
              "--max-tokens", "16", "--batch-size", "4", "--threads", "1"]
    assert main([*common, "--num-prompts", "4"]) == 0
    first = read_records(data / "data.jsonl")
    assert main([*common, "--num-prompts", "6", "--cache-features"]) == 0  # resumes: only 2 new answers
    return models, root, data, first


def test_prepare_is_resumable_and_regenerates_with_the_target(prepared):
    models, _, data, first = prepared
    records = read_records(data / "data.jsonl")
    assert len(first) == 4 and len(records) == 6
    assert len({record.id for record in records}) == 6
    assert records[:4] == first  # append-only: the first run's lines are untouched
    for record in records:
        assert record.output_token_ids == greedy_reference(models.target, record.prompt_token_ids, 16)
    index = json.loads((data / "features" / "index.json").read_text())
    assert set(index["shards"]) == {record.id for record in records}


def test_train_checkpoints_and_resumes_to_identical_weights(prepared):
    models, root, data, _ = prepared
    common = ["deepspec", "train", "--data", str(data), "--target", str(models.target_dir), *TRAIN,
              "--steps", "4", "--checkpoint-every", "2", "--features", "online"]
    straight, sliced = root / "straight", root / "sliced"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(sliced), "--stop-after", "2"]) == 0
    assert not (sliced / "model.safetensors").exists()
    assert main([*common, "--out", str(sliced), "--resume"]) == 0

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(sliced / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    drafter = load_dspark(straight, models.target)
    assert drafter.config.block_size == 4 and drafter.config.sequential_head == "vanilla"
    assert "deepspec train" in (straight / "README.md").read_text()


def test_train_from_the_feature_cache_and_the_two_baselines(prepared):
    models, root, data, _ = prepared
    common = ["deepspec", "train", "--data", str(data), "--target", str(models.target_dir), *TRAIN, "--steps", "2"]
    assert main([*common, "--out", str(root / "ablation"), "--features", "cache", "--sequential-head", "none",
                 "--storage-dtype", "bfloat16"]) == 0
    assert load_dspark(root / "ablation", models.target).sequential_head is None
    assert main([*common, "--out", str(root / "draft-lm"), "--draft-lm", "--draft-hidden-size", "32",
                 "--draft-layers", "1", "--draft-heads", "2", "--draft-intermediate-size", "64"]) == 0
    draft = load_causal_lm(root / "draft-lm")
    assert draft.config.vocab_size == models.target.config.vocab_size
