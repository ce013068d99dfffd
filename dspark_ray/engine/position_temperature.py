"""Llama 4's attention temperature on its NoPE layers, from the forward's position ids.

Llama 4 scales the queries of its layers without rotary embeddings by
`1 + attn_scale * log1p(floor((position + 1) / floor_scale))`, taking each position as the number
of slots already in the HF cache plus the query's offset. The engine's cache has holes (padding,
rolled-back drafts) and ragged rows, so that count is not a token's position; the position ids
the engine passes are. Inside `by_position_ids` the model's own scaling is off and a hook on each
such layer's `q_proj` applies the same factor from the position ids instead (before the
`q_proj` output is split into heads; nothing between them acts across heads or positions, so
it is the same product). Outside the block the model is untouched, so HF `generate` on the same
model object sees its own behaviour.

This module knows Llama 4's attention attributes and nothing about caches or drafts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel


class PositionTemperature:
    def __init__(self, model: PreTrainedModel) -> None:
        self.attentions = [module for module in model.modules()
                           if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True)]

    @contextmanager
    def by_position_ids(self, position_ids: torch.Tensor) -> Iterator[None]:
        """A forward inside the block scales NoPE queries by `position_ids` ([B, T], as fed)."""
        if not self.attentions:
            yield
            return
        handles = []
        for attention in self.attentions:
            scales = _scales(attention, position_ids)  # [B, T, 1]
            handles.append(attention.q_proj.register_forward_hook(
                lambda module, args, output, scales=scales: (output * scales).to(output.dtype)))
            attention.attn_temperature_tuning = False
        try:
            yield
        finally:
            for attention, handle in zip(self.attentions, handles):
                attention.attn_temperature_tuning = True
                handle.remove()


def _scales(attention: torch.nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """Llama4TextAttention's factor, per token. # [B, T, 1]"""
    floors = torch.floor((position_ids.float() + 1.0) / attention.floor_scale)
    return (torch.log1p(floors) * attention.attn_scale + 1.0)[..., None]
