"""The bundled reference target and draft: they load offline as float32 and behave as stated."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_ray.reference import corpus, data
from dspark_ray.reference.build import DEFAULT_OUT
from dspark_ray.reference.evaluate import heldout_loss, top1_agreement

pytestmark = pytest.mark.engine

TARGET_DIR, DRAFT_DIR = DEFAULT_OUT / "target", DEFAULT_OUT / "draft"
# Measured on the first 1024 held-out tokens (fp32 CPU): target 3.879, draft 4.242 nats/token,
# top-1 agreement 61.3%; bounds leave a margin. (The first file is harder than the split's mean.)
TARGET_LOSS_BOUND = 4.0
DRAFT_LOSS_BOUND = 4.4
AGREEMENT_FLOOR = 0.55
SNIPPET = 'def f(x, *, y=None):\n\t"""Docstring with ünïcode."""\n    return  x  # trailing  \n'


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()


@pytest.fixture(scope="module")
def target():
    return _load(TARGET_DIR)


@pytest.fixture(scope="module")
def draft():
    return _load(DRAFT_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TARGET_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def heldout_windows(tokenizer):
    return data.heldout_windows(tokenizer, seq_len=256, num_tokens=1024)  # [4, 257]


def test_models_load_as_float32(target, draft):
    assert target.config.model_type == "deepseek_v3"
    assert draft.config.model_type == "llama"
    for model in (target, draft):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_shared_vocabulary_and_tokenizer(target, draft):
    assert target.config.vocab_size == draft.config.vocab_size == 4096
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (TARGET_DIR / name).read_bytes() == (DRAFT_DIR / name).read_bytes()


def test_parameter_counts(target, draft):
    from dspark_ray.reference.train_target import parameter_counts

    total, active = parameter_counts(target)
    assert 20e6 <= total <= 40e6
    assert active < total / 2
    assert 1e6 <= sum(p.numel() for p in draft.parameters()) <= 3e6


def test_tokenizer_round_trips_source(tokenizer):
    ids = tokenizer.encode(SNIPPET, add_special_tokens=False)
    assert tokenizer.decode(ids) == SNIPPET
    assert tokenizer.eos_token == "<|endoftext|>"


def test_chat_template_renders(tokenizer):
    messages = [{"role": "user", "content": "Write a sort."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nWrite a sort.\n<|assistant|>\n"


def test_heldout_loss_below_bound(target, draft, heldout_windows):
    assert heldout_loss(target, heldout_windows) < TARGET_LOSS_BOUND
    assert heldout_loss(draft, heldout_windows) < DRAFT_LOSS_BOUND


def test_draft_agrees_with_target(target, draft, heldout_windows):
    assert top1_agreement(draft, target, heldout_windows) > AGREEMENT_FLOOR


def test_prompts_and_cards():
    lines = (DEFAULT_OUT / "prompts" / "heldout.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    assert len(prompts) == 64
    assert all(100 <= len(prompt) <= 400 for prompt in prompts)
    for model_dir in (TARGET_DIR, DRAFT_DIR):
        card = (model_dir / "README.md").read_text()
        assert "bfloat16" in card and "dspark-ray build-reference" in card


def test_heldout_split_is_disjoint():
    train, heldout = corpus.split_files()
    assert heldout and not set(train) & set(heldout)
