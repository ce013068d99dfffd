"""Sliding-window and chunked attention (engine.attention_windows): the windows by token position,
the refusal of layer types whose cache the engine cannot roll back, and, on the tiny gpt-oss,
Gemma 4 and Llama 4 targets, that verifying k+1 tokens gives the logits of k+1 decode steps and
that rolled-back drafts leave no trace."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV4Config, GptOssConfig, Llama4TextConfig, LlamaConfig,
                          MistralConfig, Qwen3NextConfig)

from dspark_ray.engine.attention_windows import FULL, AttentionWindow, AttentionWindows, UnsupportedAttention
from dspark_ray.engine.loading import ModelLoadError, load_causal_lm
from dspark_ray.engine.runner import CausalLMRunner
from tiny_models import PAD_TOKEN_ID, WINDOW, WINDOWED_ARCHITECTURES

# the runner-level checks also cover a single window for all layers (one mask, no layer types)
RUNNER_ARCHITECTURES = WINDOWED_ARCHITECTURES + ("mixtral_window",)
PROMPT = list(range(3, 16))  # 13 tokens: past the first window
BLOCK = [40, 41, 42, 43, 44, 45, 46, 47, 48]  # k + 1 = 9 tokens for k = 8 drafts, longer than a window


@pytest.mark.parametrize("window, query, seen", [
    (FULL, 5, [0, 1, 2, 3, 4, 5]),
    (AttentionWindow("sliding", 3), 5, [3, 4, 5]),  # the last 3 positions, the query's own included
    (AttentionWindow("sliding", 3), 1, [0, 1]),
    (AttentionWindow("chunked", 4), 5, [4, 5]),  # its own chunk [4, 8) up to itself
    (AttentionWindow("chunked", 4), 3, [0, 1, 2, 3]),
])
def test_windows_by_token_position(window, query, seen):
    keys = torch.arange(8)[None]  # [1, K]
    causal = (keys <= query)[:, None]  # [1, 1, K]

    allowed = window.restrict(causal, torch.tensor([[query]]), keys)

    assert allowed[0, 0].nonzero().squeeze(1).tolist() == seen


def test_windows_from_configs():
    gpt_oss = AttentionWindows.of(GptOssConfig(num_hidden_layers=2, sliding_window=128))
    assert gpt_oss.by_layer_type == {"sliding_attention": AttentionWindow("sliding", 128), "full_attention": FULL}
    llama4 = AttentionWindows.of(Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=8192))
    assert llama4.by_layer_type == {"chunked_attention": AttentionWindow("chunked", 8192), "full_attention": FULL}
    assert AttentionWindows.of(MistralConfig(sliding_window=4096)).uniform == AttentionWindow("sliding", 4096)
    assert AttentionWindows.of(LlamaConfig()).all_full


@pytest.mark.parametrize("config, obstacle", [
    (Qwen3NextConfig(num_hidden_layers=4), "linear-attention layers"),
    (DeepseekV4Config(num_hidden_layers=3, compress_ratios=[0, 4, 128]), "compressed attention layers"),
])
def test_layers_without_rollback_are_refused_by_name(config, obstacle):
    with pytest.raises(UnsupportedAttention, match=obstacle):
        AttentionWindows.of(config)


def test_loading_a_linear_attention_target_names_linear_attention(tmp_path):
    config = Qwen3NextConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_value_heads=2,
                             linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
                             num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)

    with pytest.raises(ModelLoadError, match="linear-attention layers") as refused:
        load_causal_lm(tmp_path)
    assert "sliding" not in str(refused.value)


@torch.no_grad()
def full_forward_logits(model, tokens: list[int]) -> torch.Tensor:
    """HF's own forward over the whole sequence, no cache. # [T, V]"""
    return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch", RUNNER_ARCHITECTURES)
def test_verifying_k_plus_1_tokens_equals_k_plus_1_decode_steps(tiny, arch):
    model = tiny(arch).target
    assert len(PROMPT) > WINDOW and len(BLOCK) > WINDOW
    whole = CausalLMRunner(model, PAD_TOKEN_ID)
    whole.add({0: PROMPT})
    steps = CausalLMRunner(model, PAD_TOKEN_ID)
    steps.add({0: PROMPT})

    verified = whole.forward({0: BLOCK})[0]  # [k+1, V]
    stepped = torch.stack([steps.forward({0: [token]})[0, 0] for token in BLOCK])  # [k+1, V]

    torch.testing.assert_close(verified, stepped, atol=1e-4, rtol=1e-4)  # fp32, different batch shapes
    expected = full_forward_logits(model, PROMPT + BLOCK)[len(PROMPT):]
    torch.testing.assert_close(verified, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", RUNNER_ARCHITECTURES)
def test_rolled_back_drafts_leave_no_trace(tiny, arch):
    """Two ragged rows: row 0 verifies 9 tokens and keeps 3, row 1 one token; both go on from
    there, over two more forwards (the second one's keys sit behind the holes), as if the rejected
    tokens had never been fed."""
    model = tiny(arch).target
    other = [90, 91, 92, 93, 94]
    runner = CausalLMRunner(model, PAD_TOKEN_ID)
    runner.add({0: PROMPT, 1: other})
    runner.forward({0: BLOCK, 1: [95]})

    runner.sync({0: PROMPT + BLOCK[:3] + [60], 1: other + [95, 96]})  # 6 of row 0's slots rejected
    first = runner.forward({0: [60, 61, 62, 63, 64], 1: [96, 97]})
    second = runner.forward({0: [65, 66, 67, 68, 69, 70], 1: [98]})

    row_0 = PROMPT + BLOCK[:3] + list(range(60, 71))
    assert runner.cached_tokens(0) == row_0
    expected = full_forward_logits(model, row_0)[len(PROMPT) + 3:]  # [11, V]
    torch.testing.assert_close(torch.cat([first[0, :5], second[0]]), expected, atol=1e-4, rtol=1e-4)
    expected = full_forward_logits(model, other + [95, 96, 97, 98])[-3:]
    torch.testing.assert_close(torch.cat([first[1, :2], second[1, :1]]), expected, atol=1e-4, rtol=1e-4)
