"""Saving and loading DSpark drafters: a faithful round trip, only the drafter's own weights on disk,
and a clear ModelLoadError whenever the directory or the target does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_ray.config import EngineConfig
from dspark_ray.dspark.io import load_dspark, read_dspark_config, save_dspark
from dspark_ray.dspark.signature import target_fingerprint
from dspark_ray.engine.factory import load_models
from dspark_ray.engine.loading import ModelLoadError
from tiny_models import build_target


def test_round_trip_keeps_config_and_weights(tiny_targets, tiny_dspark, tmp_path):
    target = tiny_targets("llama").target
    original = tiny_dspark("llama", "rnn", block_size=3, trained=False).model
    save_dspark(original, tmp_path / "copy", card="# card\n")

    loaded = load_dspark(tmp_path / "copy", target)

    assert loaded.config == original.config
    for (name, mine), (other_name, theirs) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert name == other_name and torch.equal(mine, theirs), name
    assert (tmp_path / "copy" / "README.md").read_text() == "# card\n"
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["model_type"] == "dspark"


def test_directory_holds_only_the_drafters_own_weights(tiny_targets, tiny_dspark):
    drafter = tiny_dspark("llama", "vanilla", block_size=4)
    stored = load_file(str(drafter.directory / "model.safetensors"))
    vocab_size = tiny_targets("llama").target.config.vocab_size
    hidden = tiny_targets("llama").target.config.hidden_size
    # The target's embeddings / lm_head ([V, H]) are borrowed at load time, never stored.
    assert not any(tensor.shape == (vocab_size, hidden) for tensor in stored.values())
    assert set(stored) == set(drafter.model.state_dict())


def test_bfloat16_storage_loads_back_as_float32(tiny_targets, tiny_dspark, tmp_path):
    target = tiny_targets("llama").target
    original = tiny_dspark("llama", "gated", block_size=4).model
    save_dspark(original, tmp_path / "bf16", storage_dtype=torch.bfloat16)

    loaded = load_dspark(tmp_path / "bf16", target)

    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(tensor.dtype == torch.bfloat16 for tensor in stored.values())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name


@pytest.mark.parametrize(("other", "field"), [
    (dict(arch="llama", seed=7), "fingerprint"),  # same shape, other weights
    (dict(arch="llama", vocab_size=96), "vocab_size"),
    (dict(arch="qwen3_moe"), "architecture"),
])
def test_loading_against_another_target_is_refused(tiny_dspark, tmp_path, other, field):
    drafter = tiny_dspark("llama", "vanilla", block_size=4)
    other_target = build_target(other.pop("arch"), tmp_path / "other", **other)

    with pytest.raises(ModelLoadError, match=field):
        load_dspark(drafter.directory, other_target)


def test_the_engine_config_path_refuses_another_target_too(tiny_targets, tiny_dspark):
    config = EngineConfig(target=tiny_targets("deepseek_v3").target_dir, drafter="dspark",
                          draft=tiny_dspark("llama", "vanilla", block_size=4).directory)
    with pytest.raises(ModelLoadError, match="trained for another target"):
        load_models(config)


def test_a_directory_that_is_no_dspark_drafter_is_refused(tiny_targets, tmp_path):
    models = tiny_targets("llama")
    with pytest.raises(ModelLoadError, match="not a DSpark drafter"):
        read_dspark_config(models.draft_dir)  # an HF draft LM directory
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_dspark(tmp_path / "missing", models.target)


def test_fingerprint_ignores_the_dtype_the_target_is_loaded_in(tiny_targets):
    target = tiny_targets("llama").target
    rounded = {name: p.detach().to(torch.bfloat16).float() for name, p in target.state_dict().items()}
    copy = type(target)(target.config)
    copy.load_state_dict(rounded)
    assert target_fingerprint(copy) == target_fingerprint(copy.to(torch.bfloat16))
