"""What the drafter learns from: the frozen target run over regenerated sequences.

One no-grad target forward over a right-padded batch yields the captured states of the chosen
layers (the drafter's context features, exactly what the engine's verifier captures at inference)
and the final hidden state (the lm_head input), from which the target's logits follow. The final
hidden state is what the on-disk cache stores instead of logits: 1 x hidden_size numbers per token
instead of vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from dspark_ray.engine.feature_capture import LayerCapture


@dataclass(frozen=True, eq=False)
class TargetBatch:
    features: torch.Tensor  # [B, T, L*E] float32 captured layers, concatenated
    final_hidden: torch.Tensor  # [B, T, E] float32: the lm_head input


class TargetPass:
    def __init__(self, target: PreTrainedModel, layer_ids: list[int]) -> None:
        self.target = target.eval().requires_grad_(False)
        self.capture = LayerCapture(target, list(layer_ids))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TargetBatch:
        """input_ids `[B, T]` right-padded, lengths `[B]`."""
        final: list[torch.Tensor] = []
        keep_final = self.target.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: final.append(args[0]))
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        device = self.target.get_input_embeddings().weight.device
        try:
            with self.capture.recording():
                self.target(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        finally:
            keep_final.remove()
        return TargetBatch(self.capture.take(), final[-1].float())

    @torch.no_grad()
    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Target logits from lm_head inputs. `[..., E]` -> `[..., V]` float32"""
        head = self.target.get_output_embeddings()
        return head(final_hidden.to(head.weight.dtype)).float()
