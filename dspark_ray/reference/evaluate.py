"""Held-out metrics: mean next-token cross-entropy, and draft-target top-1 agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over `windows` `[W, S + 1]`."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(next(model.parameters()).device)
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        labels = batch[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += labels.numel()
    return total / count


@torch.no_grad()
def top1_agreement(
    draft: torch.nn.Module, target: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> float:
    """Fraction of positions where the draft's argmax equals the target's greedy next token."""
    draft.eval()
    target.eval()
    agree, count = 0, 0
    for batch in windows.split(batch_size):
        input_ids = batch[:, :-1].to(next(target.parameters()).device)
        target_tokens = target(input_ids=input_ids).logits.argmax(-1)  # [B, S]
        draft_tokens = draft(input_ids=input_ids).logits.argmax(-1)  # [B, S]
        agree += (target_tokens == draft_tokens).sum().item()
        count += target_tokens.numel()
    return agree / count
