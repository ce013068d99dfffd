"""The reference build recipe: `--smoke` builds are deterministic and load with transformers."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_ray.reference.build import main

pytestmark = pytest.mark.engine

WEIGHT_FILES = ("target/model.safetensors", "draft/model.safetensors")


@pytest.mark.slow
def test_smoke_build_is_deterministic_and_loads(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert main(["--smoke", "--seed", "3", "--out", str(out)]) == 0
    for name in WEIGHT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    for model_dir in (first / "target", first / "draft"):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        assert model.config.vocab_size == len(tokenizer)
    assert len((first / "prompts" / "heldout.jsonl").read_text().splitlines()) == 64
