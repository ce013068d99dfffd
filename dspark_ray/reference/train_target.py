"""The reference target: a small DeepSeek-V3 (MLA + MoE) LM trained for next-token prediction.

Architecture as DeepSeek-V3, scaled down: multi-head latent attention with low-rank query and
key-value projections, the first layer dense, the others Mixture-of-Experts with one shared
expert and top-k routed experts, no sliding window. Trained on the corpus's train split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from dspark_ray.reference.data import WindowSampler
from dspark_ray.reference.trainer import TrainConfig, TrainResult, train

# grouped_mm trains faster than the eager per-expert loop on CPU (docs/design/reasons.md).
EXPERTS_IMPLEMENTATION = "grouped_mm"


@dataclass(frozen=True)
class TargetShape:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    dense_intermediate: int = 768
    moe_intermediate: int = 256
    num_routed_experts: int = 16
    experts_per_token: int = 2
    q_lora_rank: int = 128
    kv_lora_rank: int = 64


SMOKE_SHAPE = TargetShape(
    hidden_size=64, num_layers=2, num_heads=2, dense_intermediate=128, moe_intermediate=32,
    num_routed_experts=4, experts_per_token=2, q_lora_rank=32, kv_lora_rank=16,
)  # fmt: skip


def target_config(shape: TargetShape, vocab_size: int, eos_token_id: int) -> DeepseekV3Config:
    """A DeepSeek-V3 config of the given shape (one dense layer first, the rest MoE)."""
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.dense_intermediate,
        moe_intermediate_size=shape.moe_intermediate,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        n_shared_experts=1,
        n_routed_experts=shape.num_routed_experts,
        num_experts_per_tok=shape.experts_per_token,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        experts_implementation=EXPERTS_IMPLEMENTATION,
    )


def parameter_counts(model: DeepseekV3ForCausalLM) -> tuple[int, int]:
    """(total, active per token): only `top_k` of the routed experts run for each token."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(
        p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name
    )
    inactive_fraction = 1.0 - config.num_experts_per_tok / config.n_routed_experts
    return total, total - round(routed * inactive_fraction)


def next_token_loss(model: torch.nn.Module):
    """Loss function for the trainer: mean cross-entropy of each window's next tokens."""

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return loss_fn


def train_target(
    config: DeepseekV3Config, sampler: WindowSampler, train_config: TrainConfig, device: str = "cpu"
) -> tuple[DeepseekV3ForCausalLM, TrainResult]:
    """Build a freshly initialised target (seed set by the caller) and train it."""
    model = DeepseekV3ForCausalLM(config).to(device)
    result = train(model, sampler, next_token_loss(model), train_config, desc="target")
    return model, result
