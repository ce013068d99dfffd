"""The DSpark drafter network: parallel backbone + sequential head + confidence head.

Block layout (DFlash style): for an anchor at position `a` (the last committed token, not yet seen
by the target), the block input is `[E[x_a], m, m, ..., m]` (`block_size` positions, `m` a learned
placeholder) plus learned block-position embeddings; block position k sits at RoPE position a + k
and predicts token a + k + 1. Block positions attend to the context keys/values of tokens < a (the
target's captured states, fused by `context_proj`) and bidirectionally to each other. One forward
gives the hidden states h_k and base logits `U_k` of every position; the cheap heads then run
position by position (drafting) or all at once (teacher forcing in training).

The target's token embeddings `E` and lm_head are used, frozen, by reference: they are handed in at
construction and are not parameters of this module, so a saved drafter holds only its own weights.
This module knows nothing about the engine, sequences or sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark_ray.dspark.backbone import BackboneLayer
from dspark_ray.dspark.config import DSparkConfig
from dspark_ray.dspark.heads import ConfidenceHead, SequentialHead


@dataclass(frozen=True, eq=False)
class TargetParts:
    """The target modules a drafter borrows (never registered as submodules)."""

    embedding: nn.Embedding  # [V, E]
    lm_head: nn.Linear  # E -> V


@dataclass(frozen=True, eq=False)
class BlockOutput:
    hidden: torch.Tensor  # [B, A, K, D] backbone states h_k
    base_logits: torch.Tensor  # [B, A, K, V] U_k


class DSparkModel(nn.Module):
    def __init__(self, config: DSparkConfig, target: TargetParts) -> None:
        super().__init__()
        self.config = config
        self.target = target
        width, embed_size, vocab_size = config.hidden_size, config.target.hidden_size, config.target.vocab_size
        self.context_proj = nn.Linear(config.feature_size, width, bias=False)
        self.context_norm = nn.RMSNorm(width, eps=config.rms_norm_eps)
        self.input_proj = nn.Identity() if width == embed_size else nn.Linear(embed_size, width, bias=False)
        self.mask_embedding = nn.Parameter(torch.empty(width))
        self.block_position_embedding = nn.Parameter(torch.empty(config.block_size, width))
        self.layers = nn.ModuleList(
            BackboneLayer(width, config.num_heads, config.intermediate_size, config.rope_theta, config.rms_norm_eps)
            for _ in range(config.num_layers))
        self.final_norm = nn.RMSNorm(width, eps=config.rms_norm_eps)
        self.output_proj = nn.Identity() if width == embed_size else nn.Linear(width, embed_size, bias=False)
        self.sequential_head = None
        if config.sequential_head != "none":
            self.sequential_head = SequentialHead(config.sequential_head, embed_size, width, config.head_rank,
                                                  vocab_size)
        self.confidence_head = ConfidenceHead(width, embed_size)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.mask_embedding, std=std)
        nn.init.normal_(self.block_position_embedding, std=std)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Frozen target embeddings. `[...]` -> `[..., E]`"""
        return F.embedding(token_ids, self.target.embedding.weight.detach()).to(self.mask_embedding.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Base logits through the frozen target lm_head. `[..., D]` -> `[..., V]`"""
        head = self.target.lm_head
        bias = None if head.bias is None else head.bias.detach()
        projected = self.output_proj(hidden)
        return F.linear(projected.to(head.weight.dtype), head.weight.detach(), bias).to(hidden.dtype)

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Per-layer context keys/values, computed once per context token.

        features `[..., S, L*E]` (captured target layers), positions `[..., S]` -> `[..., S, layers, 2, D]`
        """
        context = self.context_norm(self.context_proj(features.to(self.mask_embedding.dtype)))
        return torch.stack([layer.context_keys_values(context, positions) for layer in self.layers], dim=-3)

    def forward(
        self,
        anchor_ids: torch.Tensor,  # [B, A] last committed token of each block
        anchor_positions: torch.Tensor,  # [B, A] its position in the sequence
        context_kv: torch.Tensor,  # [B, S, layers, 2, D]
        context_mask: torch.Tensor,  # [B, A, S] bool: context slots each block may attend to
        num_positions: int | None = None,  # block positions to run (default block_size)
    ) -> BlockOutput:
        """ONE backbone forward for A blocks per row: hidden states and base logits of every position."""
        batch, num_anchors = anchor_ids.shape
        size = num_positions or self.block_size
        placeholders = self.mask_embedding.expand(batch, num_anchors, size - 1, -1)
        x = torch.cat([self.input_proj(self.embed(anchor_ids))[:, :, None], placeholders], dim=2)  # [B, A, K, D]
        x = (x + self.block_position_embedding[:size]).flatten(1, 2)  # [B, A*K, D]
        positions = (anchor_positions[:, :, None] + torch.arange(size, device=anchor_ids.device)).flatten(1)
        mask = _block_mask(context_mask, size)  # [B, A*K, S + A*K]
        for index, layer in enumerate(self.layers):
            x = layer(x, positions, context_kv[:, :, index], mask)
        hidden = self.final_norm(x).unflatten(1, (num_anchors, size))  # [B, A, K, D]
        return BlockOutput(hidden, self.logits(hidden))

    def head_step(
        self,
        hidden: torch.Tensor,  # [B, D] h_k
        base_logits: torch.Tensor,  # [B, V] U_k
        prev_ids: torch.Tensor,  # [B] x_{k-1}
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draft logits `U_k + B_k` [B, V], confidence logits [B] and the next head state."""
        prev_embedding = self.embed(prev_ids)
        confidence = self.confidence_head(hidden, prev_embedding)
        if self.sequential_head is None:
            return base_logits, confidence, state
        bias, state = self.sequential_head.step(prev_embedding, hidden, state)
        return base_logits + bias, confidence, state

    def initial_head_state(self, batch_size: int) -> torch.Tensor | None:
        if self.sequential_head is None:
            return None
        return self.sequential_head.initial_state(batch_size, self.mask_embedding)

    def teacher_forced(
        self,
        output: BlockOutput,
        prev_ids: torch.Tensor,  # [B, A, K] x_{k-1}: the anchor then the data's tokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits [B, A, K, V] and confidence logits [B, A, K] with the data as the prefix."""
        prev_embeddings = self.embed(prev_ids)  # [B, A, K, E]
        confidence = self.confidence_head(output.hidden, prev_embeddings)
        if self.sequential_head is None:
            return output.base_logits, confidence
        bias = self.sequential_head.teacher_forced(prev_embeddings.flatten(0, 1), output.hidden.flatten(0, 1))
        return output.base_logits + bias.unflatten(0, prev_ids.shape[:2]), confidence


def _block_mask(context_mask: torch.Tensor, size: int) -> torch.Tensor:
    """[B, A, S] context mask -> [B, A*K, S + A*K]: context as given, bidirectional within a block."""
    batch, num_anchors, _ = context_mask.shape
    to_context = context_mask.repeat_interleave(size, dim=1)  # [B, A*K, S]
    block_ids = torch.arange(num_anchors * size, device=context_mask.device) // size
    to_block = (block_ids[:, None] == block_ids[None, :]).expand(batch, -1, -1)  # [B, A*K, A*K]
    return torch.cat([to_context, to_block], dim=2)
