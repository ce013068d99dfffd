"""Packed forwards (engine.packed_forward): a ragged batch's real tokens go through the model as one
row, and logits, captured features and the KV cache come out as the padded forward leaves them."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dspark_ray.engine import packed_forward
from dspark_ray.engine.absorbed_mla import crossover_queries
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.loading import load_causal_lm
from dspark_ray.engine.packed_forward import (PACKED_ATTENTION, PACKED_EAGER_ATTENTION, SHORT_ROW_QUERIES, Packing,
                                              attention_groups, enable_packing)
from dspark_ray.engine.runner import FUSED_PROMPT_TOKENS_PACKED, FUSED_PROMPT_TOKENS_PADDED, CausalLMRunner
from dspark_ray.engine.verifier import TargetVerifier
from dspark_ray.generate_cli import add_engine_arguments, engine_config_from_args
from tiny_models import ARCHITECTURES, WINDOWED_ARCHITECTURES

PROMPTS = {0: [11, 12, 13, 14, 15], 1: [21], 2: [31, 32, 33, 34, 35, 36, 37, 38, 39]}
FEED = {0: [16, 17, 18], 1: [22], 2: [40, 41, 42, 43, 44, 45]}  # ragged: 3, 1 and 6 tokens


def test_pack_and_unpack_round_trip():
    query_valid = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    padded = torch.arange(9 * 2, dtype=torch.float32).reshape(3, 3, 2)
    packing = Packing.of(query_valid, torch.device("cpu"))

    packed = packing.pack(padded)

    assert packed.shape == (1, 6, 2)
    assert torch.equal(packed[0], padded[query_valid])  # row-major order of the real tokens
    unpacked = packing.unpack(packed)
    assert torch.equal(unpacked[query_valid], padded[query_valid])
    assert not unpacked[~query_valid].any()  # zeros at padding
    heads = torch.stack([packed[0] + 100 * head for head in range(4)])[None]  # [1, H=4, N, D]
    unpacked_heads = packing.unpack_heads(heads)  # [B, H, T, D]
    assert unpacked_heads.shape == (3, 4, 3, 2)
    for head in range(4):
        assert torch.equal(unpacked_heads[:, head][query_valid], padded[query_valid] + 100 * head)


def run_ragged(model, packs: bool, capture_layers: list[int] | None = None, feed: dict | None = None):
    """Prefill PROMPTS, then feed `feed` (FEED by default; sequences it names beyond PROMPTS join
    with their prompts in that forward)."""
    feed = FEED if feed is None else feed
    runner = CausalLMRunner(model, 0, capture_layers)
    runner.packs = packs and runner.packs
    fed = []
    forward = model.forward

    def spied(*args, **kwargs):
        fed.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    model.forward = spied
    try:
        prefill_logits = runner.add(PROMPTS)
        runner.join([seq_id for seq_id in feed if seq_id not in PROMPTS])
        logits = runner.forward(feed)
    finally:
        del model.forward
    return runner, fed, prefill_logits, logits


@pytest.mark.parametrize("arch", ARCHITECTURES + WINDOWED_ARCHITECTURES)
def test_a_packed_forward_equals_the_padded_one(tiny, arch):
    model = tiny(arch).target
    padded, padded_fed, padded_prefill, padded_logits = run_ragged(model, packs=False, capture_layers=[0, 1])
    packed, packed_fed, packed_prefill, packed_logits = run_ragged(model, packs=True, capture_layers=[0, 1])

    # gpt-oss has eager attention only (sinks): it packs with its own eager function
    assert packed.packs and model.config._attn_implementation == (
        PACKED_EAGER_ATTENTION if arch == "gpt_oss" else PACKED_ATTENTION)
    assert padded_fed == [3 * 9, 3 * 6] and packed_fed == [15, 10]  # only the real tokens are fed
    torch.testing.assert_close(packed_prefill, padded_prefill, atol=1e-5, rtol=1e-5)
    valid = torch.zeros(3, 6, dtype=torch.bool)
    for row, tokens in enumerate(FEED.values()):
        valid[row, : len(tokens)] = True
    torch.testing.assert_close(packed_logits[valid], padded_logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.last_features[valid], padded.last_features[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.cache.slot_valid, padded.cache.slot_valid)  # the same layout
    for mine, theirs in zip(packed.cache._layers(), padded.cache._layers()):
        slots = packed.cache.slot_valid  # [B, S]: compare the KV of cached tokens (padding may differ)
        torch.testing.assert_close(mine.keys.transpose(1, 2)[slots], theirs.keys.transpose(1, 2)[slots],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values.transpose(1, 2)[slots], theirs.values.transpose(1, 2)[slots],
                                   atol=1e-5, rtol=1e-5)


def test_short_and_long_rows_attend_in_groups_of_their_own():
    device = torch.device("cpu")
    assert attention_groups([1, 3, SHORT_ROW_QUERIES], device) is None  # all short: one padded batch
    assert attention_groups([20, 40], device) is None  # all long
    contiguous = attention_groups([2, 1, 20, 30], device)
    assert contiguous == ((slice(0, 2), 2), (slice(2, 4), 30))  # views of the rows, no copies
    (short_rows, short_queries), (long_rows, long_queries) = attention_groups([1, 20, 3], device)
    assert torch.equal(short_rows, torch.tensor([0, 2])) and short_queries == 3
    assert long_rows == slice(1, 2) and long_queries == 20


def test_grouped_attention_equals_the_padded_one_at_real_positions():
    """Rows of 1, 20 and 3 new tokens after 5 cached slots; the short rows' group is rows 0 and 2
    (indexed, not sliced)."""
    torch.manual_seed(0)
    num_queries, num_old = [1, 20, 3], 5
    query_valid = torch.arange(20)[None, :] < torch.tensor(num_queries)[:, None]  # [3, 20]
    query, key, value = torch.randn(3, 4, 20, 8), torch.randn(3, 2, 25, 8), torch.randn(3, 2, 25, 8)
    causal = torch.arange(25)[None, :] <= num_old + torch.arange(20)[:, None]  # [T, S + T]
    allowed = causal[None] & torch.cat([torch.ones(3, num_old, dtype=torch.bool), query_valid], 1)[:, None]
    allowed |= (torch.arange(25)[None, :] == num_old + torch.arange(20)[:, None])[None]
    mask = torch.zeros(3, 1, 20, 25).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    groups = attention_groups(num_queries, torch.device("cpu"))
    assert isinstance(groups[0][0], torch.Tensor)

    grouped = packed_forward._attend_in_groups(sdpa_attention_forward, module, query, key, value, mask, groups)
    padded, _ = sdpa_attention_forward(module, query, key, value, mask)

    torch.testing.assert_close(grouped[query_valid], padded[query_valid], atol=1e-6, rtol=1e-6)
    assert not grouped[[0, 2], 3:].any()  # past the short group's 3 queries: nothing computed


@pytest.mark.parametrize("arch", ARCHITECTURES + WINDOWED_ARCHITECTURES)
def test_a_prompt_beside_short_rows_attends_apart_and_changes_nothing(tiny, arch, monkeypatch):
    """A 20-token prompt joins three running rows (1-6 new tokens): the forward attends in two groups,
    and every real position's logits, and the cached KV, are the padded forward's."""
    model = tiny(arch).target
    feed = {**FEED, 7: list(range(60, 80))}
    padded, _, _, padded_logits = run_ragged(model, packs=False, feed=feed)
    grouped_calls = []
    attend_in_groups = packed_forward._attend_in_groups
    monkeypatch.setattr(packed_forward, "_attend_in_groups",
                        lambda *args, **kwargs: grouped_calls.append(args[-1]) or attend_in_groups(*args, **kwargs))
    packed, packed_fed, _, packed_logits = run_ragged(model, packs=True, feed=feed)

    assert packed_fed[1] == 3 + 1 + 6 + 20
    num_layers = model.config.num_hidden_layers  # the prefill of PROMPTS (5, 1 and 9 tokens) came first
    assert grouped_calls[-num_layers:] == [((slice(0, 3), 6), (slice(3, 4), 20))] * num_layers
    valid = torch.zeros(4, 20, dtype=torch.bool)
    for row, tokens in enumerate(feed.values()):
        valid[row, : len(tokens)] = True
    torch.testing.assert_close(packed_logits[valid], padded_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.cache.slot_valid, padded.cache.slot_valid)
    for mine, theirs in zip(packed.cache._layers(), padded.cache._layers()):
        slots = packed.cache.slot_valid
        torch.testing.assert_close(mine.keys.transpose(1, 2)[slots], theirs.keys.transpose(1, 2)[slots],
                                   atol=1e-5, rtol=1e-5)


def test_without_a_packing_the_attention_is_plain_sdpa(tiny):
    model = tiny("llama").target
    tokens = torch.tensor([[11, 12, 13, 14]])
    enable_packing(model)
    packed_model = model(input_ids=tokens).logits
    model.set_attn_implementation("sdpa")
    try:
        torch.testing.assert_close(packed_model, model(input_ids=tokens).logits, atol=0, rtol=0)
    finally:
        enable_packing(model)


def test_a_model_without_sdpa_keeps_padded_forwards(tiny):
    model = load_causal_lm(tiny("llama").target_dir)
    model.set_attn_implementation("eager")

    runner = CausalLMRunner(model, 0)

    assert not runner.packs and model.config._attn_implementation == "eager"
    runner.add(PROMPTS)
    assert runner.forward(FEED).shape[:2] == (3, 6)


@pytest.mark.parametrize("flag, field, runner_uses_it", [
    ("packed-forwards", "packed_forwards", lambda runner: runner.packs),
    ("absorbed-mla", "absorbed_mla", lambda runner: runner.absorb_up_to > 0),  # engine.absorbed_mla
])
def test_the_flag_and_the_config_turn_it_off(flag, field, runner_uses_it):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    default = engine_config_from_args(parser.parse_args(["--drafter", "none"]))
    config = engine_config_from_args(parser.parse_args([f"--no-{flag}", "--drafter", "none"]))
    assert getattr(default, field) is True and getattr(config, field) is False

    assert runner_uses_it(build_engine(default, load_models(default)).verifier.runner)
    assert not runner_uses_it(build_engine(config, load_models(config)).verifier.runner)


@pytest.mark.parametrize("arch, packs, limit", [
    ("llama", True, FUSED_PROMPT_TOKENS_PACKED),
    ("llama", False, FUSED_PROMPT_TOKENS_PADDED),  # a prompt would pad every row to its length
    ("deepseek_v3", True, crossover_queries(16, 8, 12)),  # no further than absorbed MLA pays (26 < 64)
])
def test_the_longest_prompt_fused_beside_other_rows(tiny, arch, packs, limit):
    runner = CausalLMRunner(tiny(arch).target, 0)
    runner.packs = packs and runner.packs

    assert runner.fused_prompt_limit == limit
    assert TargetVerifier(runner).fused_prompt_limit == limit
