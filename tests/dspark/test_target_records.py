"""Every artifact knows its target (issue 26, findings 1, 2 and 4): `prepare` records the target and
its tokenizer's fingerprint next to the data, `train` takes the target from there and records it
in the drafter, and every command refuses an artifact of another target (another tokenizer or
other weights) in one line; bundled drafters only for the bundled target; old artifacts warn."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dspark_ray.cli import main
from dspark_ray.config import DEFAULT_DRAFT_DIR, DEFAULT_TARGET_DIR, REFERENCE_DIR, EngineConfig
from dspark_ray.dspark.io import read_dspark_config
from dspark_ray.engine.factory import check_draft_target
from dspark_ray.engine.loading import load_tokenizer
from dspark_ray.target_record import (RECORD_NAME, TargetMismatchError, directory_tokenizer_fingerprint,
                                      read_record, tokenizer_fingerprint)
from tiny_models import VOCAB_SIZE, build_target, save_tokenizer

PROMPTS = ["t5 t6 t7", "t9 t10 t11 t12", "t20 t21 t22", "t40 t41"]
TRAIN = ["--block-size", "4", "--hidden-size", "32", "--num-heads", "2", "--head-rank", "8", "--batch-size", "2",
         "--anchors", "2", "--warmup-steps", "1", "--threads", "1", "--steps", "2", "--features", "online"]


def save_word_tokenizer(directory, prefix: str) -> None:
    """A word-level tokenizer of VOCAB_SIZE words '<prefix><i>' (same size, other tokens for another prefix)."""
    tokenizer = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(VOCAB_SIZE)}, unk_token=f"{prefix}1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=f"{prefix}1", pad_token=f"{prefix}0") \
        .save_pretrained(directory)


@pytest.fixture(scope="module")
def run(tiny_targets, tmp_path_factory):
    """A dataset prepared for the tiny Llama target, a drafter trained on it without naming the
    target, and that target's weights under another tokenizer of the same size."""
    llama = tiny_targets("llama")
    root = tmp_path_factory.mktemp("records")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["deepspec", "prepare", "--out", str(root / "data"), "--target", str(llama.target_dir),
                 "--prompts", str(prompts), "--max-tokens", "8", "--threads", "1"]) == 0
    assert main(["deepspec", "train", "--data", str(root / "data"), "--out", str(root / "dspark"), *TRAIN]) == 0
    other = root / "other-tokenizer"
    shutil.copytree(llama.target_dir, other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    save_word_tokenizer(other, "w")
    reseeded = root / "reseeded"  # the same tokenizer, other weights
    build_target("llama", reseeded, seed=1)
    save_tokenizer(reseeded, VOCAB_SIZE)
    return llama, root, prompts, other


def test_the_fingerprint_is_the_tokenizer_not_its_size(tmp_path):
    save_word_tokenizer(tmp_path / "a", "t")
    save_word_tokenizer(tmp_path / "b", "t")
    save_word_tokenizer(tmp_path / "c", "w")
    a, b, c = (tokenizer_fingerprint(load_tokenizer(tmp_path / name)) for name in "abc")
    assert a == b and a != c


def test_prepare_records_the_target_and_train_takes_it_from_the_data(run):
    llama, root, _, _ = run
    data_record, drafter_record = read_record(root / "data"), read_record(root / "dspark")
    assert data_record.target == str(llama.target_dir.resolve())
    assert data_record.tokenizer_fingerprint == directory_tokenizer_fingerprint(llama.target_dir)
    assert data_record.weights_fingerprint == read_dspark_config(root / "dspark").target.fingerprint
    assert drafter_record == data_record
    assert read_dspark_config(root / "dspark").target.architecture == "LlamaForCausalLM"  # not the bundled target
    assert data_record.tokenizer_fingerprint[:16] in (root / "dspark" / "README.md").read_text()


def test_train_refuses_data_of_another_target(run, capsys):
    llama, root, _, other = run
    for target in (other, root / "reseeded"):  # another tokenizer; the same one, other weights
        assert main(["deepspec", "train", "--data", str(root / "data"), "--target", str(target),
                     "--out", str(root / "refused"), *TRAIN]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert f"belongs to target {llama.target_dir.resolve()}" in error and str(target) in error
    assert not (root / "refused" / "model.safetensors").exists()


def test_prepare_refuses_to_add_another_targets_answers(run, capsys):
    _, root, prompts, other = run
    assert main(["deepspec", "prepare", "--out", str(root / "data"), "--target", str(other),
                 "--prompts", str(prompts), "--max-tokens", "8"]) == 2
    assert "belongs to target" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "calibrate", "eval"])
def test_every_command_refuses_a_drafter_of_another_target(run, command, capsys):
    _, root, prompts, other = run
    drafter = str(root / "dspark")
    argv = {
        "generate": ["generate", "--target", str(other), "--drafter", "dspark", "--draft", drafter, "--prompt", "w5"],
        "calibrate": ["deepspec", "calibrate", "--target", str(other), "--draft", drafter, "--prompts", str(prompts)],
        "eval": ["deepspec", "eval", "--target", str(other), "--drafters", f"d={drafter}:dspark",
                 "--prompts", str(prompts), "--out", str(root / "eval-refused")],
    }[command]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "belongs to target" in error and "tokenizer" in error


def test_the_distributed_draft_worker_refuses_it_too(run):
    _, root, _, other = run
    config = EngineConfig(target=other, drafter="dspark", draft=root / "dspark")
    with pytest.raises(TargetMismatchError):
        check_draft_target(config)  # what draft_worker.build_worker_drafter calls first


def test_the_drafter_names_its_target_for_generate(run, capsys):
    llama, root, _, _ = run
    assert main(["generate", "--drafter", "dspark", "--draft", str(root / "dspark"), "--prompt", "t5 t6",
                 "--max-tokens", "4", "--json", "--threads", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    assert EngineConfig(drafter="dspark", draft=root / "dspark").target == llama.target_dir.resolve()


def test_no_bundled_drafter_for_another_target(run, capsys):
    llama, _, _, _ = run
    for drafter in ("model", "dspark"):
        with pytest.raises(ValueError, match="needs --draft"):
            EngineConfig(target=llama.target_dir, drafter=drafter)
    assert main(["generate", "--target", str(llama.target_dir), "--drafter", "model", "--prompt", "t5"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    assert EngineConfig(drafter="model").draft == DEFAULT_DRAFT_DIR  # nothing named: all bundled
    assert EngineConfig(target=llama.target_dir, drafter="ngram").draft is None


def test_prepare_without_prompts_is_only_for_the_bundled_target(run, capsys):
    llama, root, _, _ = run
    assert main(["deepspec", "prepare", "--out", str(root / "corpus"), "--target", str(llama.target_dir),
                 "--num-prompts", "1", "--max-tokens", "1"]) == 2
    assert "--prompts FILE" in capsys.readouterr().err


def test_bundled_drafters_carry_the_bundled_targets_record():
    expected = directory_tokenizer_fingerprint(DEFAULT_TARGET_DIR)
    for name in ("draft", "dspark", "dspark_parallel_only"):
        record = read_record(REFERENCE_DIR / name)
        assert record is not None and record.target == str(DEFAULT_TARGET_DIR.resolve())
        assert record.tokenizer_fingerprint == expected
        check_draft_target(EngineConfig(drafter="model" if name == "draft" else "dspark", draft=REFERENCE_DIR / name))
    assert read_record(REFERENCE_DIR / "dspark").weights_fingerprint == \
        read_dspark_config(REFERENCE_DIR / "dspark").target.fingerprint


def test_an_artifact_without_a_record_warns_and_loads(run, tmp_path, caplog):
    llama, root, _, _ = run
    old = tmp_path / "old-drafter"
    shutil.copytree(root / "dspark", old)
    (old / RECORD_NAME).unlink()
    with caplog.at_level(logging.WARNING):
        check_draft_target(EngineConfig(target=llama.target_dir, drafter="dspark", draft=old))
    assert "records no target" in caplog.text
