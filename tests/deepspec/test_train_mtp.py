"""`deepspec train-mtp` on a tiny DeepSeek-V3 target that ships no MTP layer: the layer it writes is
read back by drafter 'mtp' exactly as trained (the checkpoint layout round-trips through
transformers' loader), training moves it towards the target, and decoding with it stays greedy
identical to HF `generate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from dspark_ray.config import EngineConfig
from dspark_ray.deepspec import train_mtp
from dspark_ray.deepspec.records import DATA_NAME, Record, append_records, read_records
from dspark_ray.engine.drafters.mtp import load_mtp
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the engine tests' tiny models
from tiny_models import build_target, greedy_reference, save_tokenizer  # noqa: E402

PROMPTS = [[5, 9, 13, 2, 7], [3, 3], list(range(10, 30))]

pytestmark = [pytest.mark.slow, pytest.mark.engine]  # 30 training steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-mtp")
    target = build_target("deepseek_v3", root / "target")
    save_tokenizer(root / "target", target.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(12):  # the target's own greedy answers, as `deepspec prepare` writes them
        prompt = torch.randint(1, target.config.vocab_size, (6,), generator=generator).tolist()
        records.append(Record(f"r{index}", "", prompt, greedy_reference(target, prompt, 24)))
    append_records(root / "data" / DATA_NAME, records)
    args = argparse.Namespace(data=root / "data", out=root / "mtp", target=root / "target", steps=30, batch_size=4,
                              max_len=64, lr=3e-3, warmup_steps=3, weight_decay=0.0, grad_clip=1.0, ce_weight=0.1,
                              seed=0, threads=1, time_budget_s=None)
    return root, target, train_mtp.train(args)


def test_the_written_layer_is_read_back_as_trained(trained, monkeypatch):
    root, target, _ = trained
    captured = {}
    save = train_mtp.save_file

    def keep(tensors, path, metadata=None):
        captured.update(tensors)
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_mtp, "save_file", keep)
    args = argparse.Namespace(data=root / "data", out=root / "again", target=root / "target", steps=2, batch_size=2,
                              max_len=32, lr=1e-3, warmup_steps=1, weight_decay=0.0, grad_clip=1.0, ce_weight=0.1,
                              seed=1, threads=1, time_budget_s=None)
    train_mtp.train(args)
    loaded = load_mtp(target, root / "again")
    assert train_mtp.checkpoint_tensors(loaded, target.config.num_hidden_layers).keys() == captured.keys()
    for name, tensor in train_mtp.checkpoint_tensors(loaded, target.config.num_hidden_layers).items():
        assert torch.equal(tensor, captured[name]), name


def test_training_learns_the_targets_next_next_token(trained):
    _, _, summary = trained
    assert summary["argmax_agreement_last_20"] > 0.3, summary


def test_decoding_with_the_trained_layer_is_greedy_identical(trained):
    root, target, _ = trained
    config = EngineConfig(target=root / "target", drafter="mtp", draft=root / "mtp", num_speculative_tokens=2,
                          load_aware_drafting=False)
    learned = [record.prompt_token_ids for record in read_records(root / "data" / DATA_NAME)[:3]]
    prompts = PROMPTS + learned
    seqs = build_engine(config, load_models(config)).generate([GenerationRequest(p, max_tokens=20) for p in prompts])
    assert [seq.output_token_ids for seq in seqs] == [greedy_reference(target, p, 20) for p in prompts]
    # on the sequences it learned from (12 of them: no more than that), its drafts are taken
    assert sum(seq.stats.num_accepted_tokens for seq in seqs[len(PROMPTS):]) > 0
