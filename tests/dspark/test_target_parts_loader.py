"""`load_hollow_target`: only the target tensors a DSpark drafter borrows (and the fingerprint hashes)
are read, from one safetensors file or a sharded index, tied embeddings stay tied, and the drafter
is checked against it exactly as against the whole target."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_ray.dspark.io import load_dspark
from dspark_ray.dspark.signature import target_signature
from dspark_ray.dspark.target_parts_loader import SAFETENSORS_INDEX_NAME, load_hollow_target
from dspark_ray.engine.loading import ModelLoadError, load_causal_lm
from tiny_models import target_config


def save_tiny_target(directory, tied: bool, sharded: bool, seed: int = 0) -> None:
    config = target_config("llama")
    config.tie_word_embeddings = tied
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "1GB")


@pytest.mark.parametrize(("tied", "sharded"), [(False, False), (True, True)], ids=["untied", "tied-sharded"])
def test_only_the_borrowed_tensors_are_loaded(tmp_path, tied: bool, sharded: bool) -> None:
    save_tiny_target(tmp_path, tied, sharded)
    assert (tmp_path / SAFETENSORS_INDEX_NAME).is_file() == sharded

    hollow = load_hollow_target(tmp_path)
    full = load_causal_lm(tmp_path)

    real = {name for name, param in hollow.named_parameters() if not param.is_meta}
    borrowed = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert real == borrowed  # named_parameters() lists a tied lm_head once, as the embeddings
    assert (hollow.lm_head.weight is hollow.model.embed_tokens.weight) == tied
    for name in borrowed:
        assert torch.equal(hollow.get_parameter(name), full.get_parameter(name)), name
    assert target_signature(hollow) == target_signature(full)


def test_dtype_and_drafter_check_as_with_the_whole_target(tiny_targets, tiny_dspark, tmp_path) -> None:
    drafter = tiny_dspark("llama", "vanilla", block_size=4, trained=False)
    target_dir = tiny_targets("llama").target_dir

    hollow = load_hollow_target(target_dir, dtype="bfloat16")
    model = load_dspark(drafter.directory, hollow)  # the fingerprint is the target's

    assert model.target.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.target.embedding.weight, tiny_targets("llama").target.model.embed_tokens.weight.bfloat16())
    save_tiny_target(tmp_path, tied=False, sharded=False, seed=7)  # same shapes, other weights
    with pytest.raises(ModelLoadError, match="fingerprint"):
        load_dspark(drafter.directory, load_hollow_target(tmp_path))
