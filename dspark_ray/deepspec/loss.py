"""The DSpark training loss over drafted blocks (teacher forcing).

  loss = w_ce * CE(draft, data token) + w_tv * TV(draft_probs, target_probs) + w_conf * BCE(c_k, accepted_k)

TV is the total variation distance 0.5 * sum |draft_probs - target_probs|; 1 - TV is the chance a
sampled draft token is accepted, so TV is what speculative sampling pays for. `accepted_k` is the
greedy acceptance event the confidence head predicts: the draft's argmax equals the target's at
position k, the prefix being the data's tokens (so "given the prefix was accepted" holds by
construction). `confidence_target="soft"` uses 1 - TV instead (the sampling acceptance rate).
Terms are means over valid block positions, optionally weighted by exp(-k / gamma).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0
    position_decay: float | None = None  # gamma of exp(-k / gamma); None weights positions equally
    confidence_target: str = "greedy"  # or "soft"


@dataclass(frozen=True, eq=False)
class LossTerms:
    total: torch.Tensor  # scalar, differentiable
    ce: float
    tv: float
    confidence: float
    acceptance_rate: list[float]  # [K] greedy acceptance per position (of valid positions)
    acceptance_length: float  # mean over blocks of 1 + accepted prefix length (greedy, teacher forced)


def dspark_loss(
    draft_logits: torch.Tensor,  # [N, K, V] U_k + B_k
    confidence_logits: torch.Tensor,  # [N, K]
    target_logits: torch.Tensor,  # [N, K, V] the target's logits at the same positions
    labels: torch.Tensor,  # [N, K] the data's next tokens
    valid: torch.Tensor,  # [N, K] bool, a contiguous prefix per block
    weights: LossWeights,
) -> LossTerms:
    block_size = draft_logits.shape[1]
    mask = valid.float()
    if weights.position_decay:
        positions = torch.arange(block_size, dtype=torch.float32, device=mask.device)
        mask = mask * torch.exp(-positions / weights.position_decay)
    denominator = mask.sum().clamp(min=1.0)

    draft_logprobs = draft_logits.float().log_softmax(-1)  # one pass serves CE and TV
    ce = -draft_logprobs.gather(-1, labels[..., None])[..., 0]  # [N, K]
    target_probs = target_logits.float().softmax(-1)
    tv = 0.5 * (draft_logprobs.exp() - target_probs).abs().sum(-1)  # [N, K]
    accepted = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float()  # [N, K]
    confidence_target = accepted if weights.confidence_target == "greedy" else (1.0 - tv).detach().clamp(0, 1)
    bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), confidence_target, reduction="none")

    ce_mean, tv_mean, bce_mean = ((term * mask).sum() / denominator for term in (ce, tv, bce))
    total = weights.ce * ce_mean + weights.tv * tv_mean + weights.confidence * bce_mean
    with torch.no_grad():
        valid_f = valid.float()
        per_position = (accepted * valid_f).sum(0) / valid_f.sum(0).clamp(min=1.0)
        prefix = (accepted * valid_f).cumprod(dim=1).sum(dim=1)  # [N]
        blocks = valid[:, 0]
        length = float((1.0 + prefix[blocks]).mean()) if bool(blocks.any()) else 0.0
    return LossTerms(total, ce_mean.item(), tv_mean.item(), bce_mean.item(), per_position.tolist(), length)
