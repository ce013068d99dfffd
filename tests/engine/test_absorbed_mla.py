"""Absorbed MLA (engine.absorbed_mla): DeepSeek-V3 attention over the cached latents gives the
expanded form's logits and cache, never expands the cache in decode and verification forwards,
and leaves the model HF's own outside the engine's forwards."""

from __future__ import annotations

import pytest
import torch

from dspark_ray.engine.absorbed_mla import crossover_queries, install
from dspark_ray.engine.loading import load_causal_lm
from dspark_ray.engine.runner import CausalLMRunner

PROMPTS = {0: [11, 12, 13, 14, 15], 1: [21], 2: [31, 32, 33, 34, 35, 36, 37, 38, 39]}
STEPS = [  # a verification (ragged: 3, 1 and 6 tokens), a decode step, a roll-back's re-feed
    {0: [16, 17, 18], 1: [22], 2: [40, 41, 42, 43, 44, 45]},
    {0: [19], 1: [23], 2: [46]},
    {0: [20, 21], 2: [47]},
]


class ExpansionCounter:
    """Counts the cached slots fed through `kv_b_proj` (the expansion HF does every forward)."""

    def __init__(self, model) -> None:
        self.rows = 0
        self.handles = [module.kv_b_proj.register_forward_hook(self._count)
                        for module in model.modules() if hasattr(module, "kv_b_proj")]

    def _count(self, module, inputs, output) -> None:
        self.rows += inputs[0].shape[:-1].numel()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_steps(model, absorbed: bool, packed: bool = True):
    runner = CausalLMRunner(model, 0, capture_layers=[0, 1], packed_forwards=packed, absorbed_mla=absorbed)
    counter = ExpansionCounter(model)
    try:
        outputs = [(runner.add(PROMPTS), None)]
        runner.sync({0: PROMPTS[0] + STEPS[0][0][:1]})  # roll row 0 back: a hole in its cache
        for feed in STEPS:
            outputs.append((runner.forward(feed), runner.last_features))
    finally:
        counter.close()
    return runner, outputs, counter.rows


@pytest.mark.parametrize("packed", [True, False])
def test_absorbed_attention_gives_the_expanded_logits_and_cache(tiny, packed):
    model = tiny("deepseek_v3").target
    absorbed, absorbed_out, _ = run_steps(model, absorbed=True, packed=packed)
    expanded, expanded_out, _ = run_steps(model, absorbed=False, packed=packed)

    assert absorbed.absorb_up_to == crossover_queries(16, 8, 12) and expanded.absorb_up_to == 0
    for (logits, features), (expected_logits, expected_features) in zip(absorbed_out, expanded_out):
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        if features is not None:
            torch.testing.assert_close(features, expected_features, atol=1e-5, rtol=1e-5)
    assert torch.equal(absorbed.cache.slot_valid, expanded.cache.slot_valid)
    for mine, theirs in zip(absorbed.cache._layers(), expanded.cache._layers()):
        slots = absorbed.cache.slot_valid  # the cache holds latents either way
        torch.testing.assert_close(mine.keys.transpose(1, 2)[slots], theirs.keys.transpose(1, 2)[slots],
                                   atol=1e-5, rtol=1e-5)


def test_decode_and_verification_never_expand_the_cache(tiny):
    model = tiny("deepseek_v3").target
    _, _, absorbed_rows = run_steps(model, absorbed=True)
    _, _, expanded_rows = run_steps(model, absorbed=False)

    num_layers = model.config.num_hidden_layers
    # Only the prefill (9 tokens a row, under the crossover) could expand; it runs absorbed too.
    assert absorbed_rows == 0
    assert expanded_rows > num_layers * 3 * 9  # every forward expands every row's slots


def test_forwards_over_the_crossover_run_expanded(tiny):
    model = tiny("deepseek_v3").target
    runner = CausalLMRunner(model, 0)
    long_prompt = list(range(5, 6 + runner.absorb_up_to))  # one token more than absorbing pays for
    counter = ExpansionCounter(model)
    try:
        runner.add({0: long_prompt})
        prefill_rows = counter.rows
        runner.forward({0: [7]})
    finally:
        counter.close()

    assert prefill_rows == model.config.num_hidden_layers * len(long_prompt)
    assert counter.rows == prefill_rows  # the decode step after it is absorbed


def test_outside_the_engine_the_model_is_hf_s(tiny):
    model = tiny("deepseek_v3").target
    fresh = load_causal_lm(tiny("deepseek_v3").target_dir)
    CausalLMRunner(model, 0)  # installs absorption and the engine's attention implementation
    tokens = torch.tensor([[11, 12, 13, 14, 15, 16]])

    with torch.no_grad():
        generated = model.generate(tokens, do_sample=False, max_new_tokens=8)
        expected = fresh.generate(tokens, do_sample=False, max_new_tokens=8)
        logits, expected_logits = model(input_ids=tokens).logits, fresh(input_ids=tokens).logits

    assert torch.equal(generated, expected)
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)  # HF's expanded form, bit for bit


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_models_without_mla_are_untouched(tiny, arch):
    model = tiny(arch).target
    assert install(model) == 0
    assert CausalLMRunner(model, 0).absorb_up_to == 0


def test_a_sliced_kv_b_proj_stays_expanded(tiny):
    """A tensor-parallel rank holding part of `kv_b_proj`'s heads cannot absorb it."""
    model = load_causal_lm(tiny("deepseek_v3").target_dir)
    for module in model.modules():
        if hasattr(module, "kv_b_proj"):
            half = module.kv_b_proj.weight.shape[0] // 2
            module.kv_b_proj = torch.nn.Linear(module.kv_lora_rank, half, bias=False)
    assert install(model) == 0


def test_crossover_follows_the_head_dimensions():
    assert crossover_queries(64, 32, 32) == 63  # the bundled target: T * 64 < 4096
    assert crossover_queries(512, 128, 128) == 170  # DeepSeek-V3
    assert crossover_queries(16, 16, 16) == 1 << 30  # absorbing is never the dearer
