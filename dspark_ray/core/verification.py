"""Lossless verification of drafted tokens: the speculative sampling rule.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (Algorithm 1),
and Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"
(Algorithm 2). Names follow this project, not the papers' p/q letters:

- draft token j is *accepted* with probability min(1, target_probs(x_j) / draft_probs(x_j));
- at the first rejection the *recovered* token is sampled from
  normalize(max(0, target_probs - draft_probs)) at that position;
- if every draft token is accepted the *bonus* token is sampled from target_probs at the next
  position;
- a row emits num_accepted + 1 tokens: its acceptance length.

Greedy rows are the same rule with both distributions one-hot: a draft token is accepted iff it
is the target argmax, and the recovered or bonus token is the target argmax.

This module knows nothing about drafters, models, caches or requests: it takes the drafted ids,
the exact distributions they were sampled from, the raw target logits and one generator per row,
and returns what to commit. It mutates none of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from dspark_ray.core.sampling import SamplingTensors, logits_to_probs, sample_from_probs

PLACEHOLDER_TOKEN_ID = -1  # pads output rows past the acceptance length


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """What a verification step commits, per row: accepted draft tokens, then one target token."""

    output_token_ids: Tensor  # [B, K+1] int64: accepted, then recovered or bonus, then placeholders
    num_accepted: Tensor  # [B] int64: accepted draft tokens (acceptance length = num_accepted + 1)

    @property
    def acceptance_length(self) -> Tensor:  # [B] int64: tokens emitted per row
        return self.num_accepted + 1

    def tokens(self, row: int) -> list[int]:
        """The emitted (non-placeholder) token ids of one row."""
        return self.token_lists[row]

    @cached_property
    def token_lists(self) -> list[list[int]]:
        """Every row's emitted token ids, read from the tensors once (two host copies per step,
        not two per row)."""
        return [ids[: accepted + 1] for ids, accepted in zip(self.output_token_ids.tolist(), self.num_accepted.tolist())]

    @classmethod
    def make_dummy(
        cls, token_ids: Sequence[Sequence[int]], num_speculative_tokens: int | None = None
    ) -> VerificationResult:
        """A result that emitted `token_ids[b]` (accepted ones, then the recovered/bonus one) per row."""
        if any(len(row) == 0 for row in token_ids):
            raise ValueError("every row emits at least one token (the recovered or bonus token)")
        if num_speculative_tokens is None:
            num_speculative_tokens = max((len(row) for row in token_ids), default=1) - 1
        width = num_speculative_tokens + 1
        output = torch.full((len(token_ids), width), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
        for row, ids in enumerate(token_ids):
            output[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return cls(output, torch.tensor([len(row) - 1 for row in token_ids], dtype=torch.int64))


def acceptance_probs(
    draft_probs: Tensor,  # [...] float32: draft probability of the drafted token(s)
    target_probs: Tensor,  # [...] float32: target probability of the same token(s)
) -> Tensor:  # [...] float32
    """min(1, target_probs / draft_probs), elementwise.

    A drafted token always has draft_probs > 0; where it is 0 anyway the ratio is taken as 1 if the
    target allows the token and 0 if not, so a token the target rules out is never accepted.
    """
    ratio = target_probs / torch.where(draft_probs > 0, draft_probs, torch.ones_like(draft_probs))
    return torch.where(draft_probs > 0, ratio.clamp(max=1.0), (target_probs > 0).float())


def recovered_probs(
    draft_probs: Tensor,  # [..., V] float32
    target_probs: Tensor,  # [..., V] float32
) -> Tensor:  # [..., V] float32
    """normalize(max(0, target_probs - draft_probs)): where the recovered token is sampled from.

    The residual is all zero only when target_probs <= draft_probs everywhere, i.e. the two are
    equal (both sum to 1). Then every draft token is accepted with probability 1 and a rejection
    has probability 0, so any distribution is exact; we return target_probs, which is also the
    right limit when float rounding makes the two almost equal and a rejection does happen.
    """
    residual = (target_probs - draft_probs).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    normalized = residual / torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, normalized, target_probs)


def verify(
    draft_token_ids: Tensor,  # [B, K] int64, any value past num_draft_tokens
    num_draft_tokens: Tensor,  # [B] int64 in 0..K; 0 = empty draft, just sample one target token
    draft_probs: Tensor | None,  # [B, K, V] float32: what the drafts were sampled from (processed)
    target_logits: Tensor,  # [B, K+1, V] raw; position j scores draft j, num_draft_tokens[b] the bonus
    sampling: SamplingTensors,  # B rows
    generators: Sequence[torch.Generator | None],  # one per row; greedy rows draw nothing
) -> VerificationResult:
    """Accept the longest prefix the rule allows, then emit one recovered or bonus token per row.

    draft_probs may be None when no sampled row has a draft token (all greedy, or empty drafts).
    Each sampled row draws, from its own generator only, num_draft_tokens[b] uniforms and then one
    token, whatever the outcome; so its result depends on nothing outside its row.
    """
    _check_inputs(draft_token_ids, num_draft_tokens, draft_probs, target_logits, sampling, generators)
    batch_size, max_draft = draft_token_ids.shape
    device = target_logits.device
    greedy = sampling.is_greedy.to(device)  # [B]
    if bool(greedy.all()):
        return verify_greedy(draft_token_ids, num_draft_tokens, target_logits)
    in_draft = torch.arange(max_draft, device=device)[None, :] < num_draft_tokens[:, None]  # [B, K]
    draft_ids = torch.where(in_draft, draft_token_ids, 0)  # [B, K], padding made a valid index
    target_probs = logits_to_probs(target_logits, sampling)  # [B, K+1, V]; greedy rows one-hot

    # 1. Accept or reject every draft token: uniform < min(1, target/draft) (Leviathan Alg. 1).
    target_token_probs = target_probs[:, :max_draft].gather(-1, draft_ids[..., None])[..., 0]  # [B, K]
    draft_token_probs = torch.ones_like(target_token_probs)  # [B, K]: greedy drafts are one-hot
    if draft_probs is not None:
        gathered = draft_probs.float().gather(-1, draft_ids[..., None])[..., 0]  # [B, K]
        draft_token_probs = torch.where(greedy[:, None], draft_token_probs, gathered)
    uniforms = _draw_uniforms(num_draft_tokens, greedy, generators, max_draft).to(device)  # [B, K]
    accepted = in_draft & (uniforms < acceptance_probs(draft_token_probs, target_token_probs))  # [B, K]
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]: length of the accepted prefix

    # 2. The distribution of the one target token: residual after a rejection, else the bonus.
    emit_probs = target_probs[torch.arange(batch_size, device=device), num_accepted]  # [B, V]
    recover = (~greedy & (num_accepted < num_draft_tokens)).nonzero().squeeze(1)  # [R]
    if recover.numel() > 0:
        draft_at_rejection = draft_probs[recover, num_accepted[recover]].float()  # [R, V]
        emit_probs[recover] = recovered_probs(draft_at_rejection, emit_probs[recover])

    # 3. Draw it: greedy rows take the argmax of their one-hot, sampled rows their generator.
    emitted = emit_probs.argmax(dim=-1)  # [B]
    sampled = (~greedy).nonzero().squeeze(1).tolist()
    if sampled:
        emitted[sampled] = sample_from_probs(emit_probs[sampled], [generators[b] for b in sampled])

    return _assemble(draft_ids, num_accepted, emitted)


def verify_greedy(
    draft_token_ids: Tensor,  # [B, K] int64, any value past num_draft_tokens
    num_draft_tokens: Tensor,  # [B] int64 in 0..K
    target_logits: Tensor,  # [B, K+1, V] raw
) -> VerificationResult:
    """`verify` for a batch whose rows are all greedy: every distribution is one-hot, so accept
    while the draft equals the target argmax and emit the target argmax after the prefix (ties:
    lowest index, as `logits_to_probs`). No probabilities are built and the rule runs on host
    lists: one argmax and three host copies a step, whatever B and K (a decode step is latency-bound
    and each small tensor op costs microseconds of dispatch). Inputs are trusted (`verify` checks)."""
    batch_size, width = target_logits.shape[0], target_logits.shape[1]
    target_ids = target_logits.argmax(dim=-1).tolist()  # [B][K+1]
    outputs, num_accepted = [], []
    for drafts, count, targets in zip(draft_token_ids.tolist(), num_draft_tokens.tolist(), target_ids):
        accepted = 0
        while accepted < count and drafts[accepted] == targets[accepted]:
            accepted += 1
        outputs.append(drafts[:accepted] + [targets[accepted]] + [PLACEHOLDER_TOKEN_ID] * (width - 1 - accepted))
        num_accepted.append(accepted)
    device = target_logits.device
    return VerificationResult(
        output_token_ids=torch.tensor(outputs, dtype=torch.int64, device=device).reshape(batch_size, width),
        num_accepted=torch.tensor(num_accepted, dtype=torch.int64, device=device),
    )


def _assemble(
    draft_ids: Tensor,  # [B, K] int64
    num_accepted: Tensor,  # [B] int64
    emitted: Tensor,  # [B] int64: the recovered or bonus token
) -> VerificationResult:
    batch_size, max_draft = draft_ids.shape
    positions = torch.arange(max_draft + 1, device=draft_ids.device)[None, :]  # [1, K+1]
    padded_ids = torch.cat([draft_ids, draft_ids.new_zeros(batch_size, 1)], dim=1)  # [B, K+1]
    output = torch.where(positions < num_accepted[:, None], padded_ids, PLACEHOLDER_TOKEN_ID)
    output = torch.where(positions == num_accepted[:, None], emitted[:, None], output)  # [B, K+1]
    return VerificationResult(output_token_ids=output, num_accepted=num_accepted)


def _draw_uniforms(
    num_draft_tokens: Tensor,  # [B] int64
    greedy: Tensor,  # [B] bool
    generators: Sequence[torch.Generator | None],
    max_draft: int,
) -> Tensor:  # [B, K] float32 in [0, 1); 0 where no uniform is drawn
    """num_draft_tokens[b] uniforms from generators[b] for every sampled row, in row order.

    Greedy rows get 0: with one-hot distributions the acceptance probability is 1 or 0, and
    0 < 1 accepts while 0 < 0 rejects, with no randomness used.
    """
    uniforms = torch.zeros(len(generators), max_draft)
    rows = zip(num_draft_tokens.tolist(), greedy.tolist(), generators)
    for row, (count, is_greedy, generator) in enumerate(rows):
        if not is_greedy and count > 0:
            device = "cpu" if generator is None else generator.device
            uniforms[row, :count] = torch.rand(count, generator=generator, device=device).cpu()
    return uniforms


def _check_inputs(
    draft_token_ids: Tensor,  # [B, K]
    num_draft_tokens: Tensor,  # [B]
    draft_probs: Tensor | None,  # [B, K, V]
    target_logits: Tensor,  # [B, K+1, V]
    sampling: SamplingTensors,
    generators: Sequence[torch.Generator | None],
) -> None:
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [B, K], got {tuple(draft_token_ids.shape)}")
    batch_size, max_draft = draft_token_ids.shape
    if target_logits.dim() != 3 or target_logits.shape[:2] != (batch_size, max_draft + 1):
        raise ValueError(
            f"target_logits must be [B, K+1, V], got {tuple(target_logits.shape)}, K={max_draft}"
        )
    if num_draft_tokens.shape != (batch_size,):
        raise ValueError(f"num_draft_tokens must be [{batch_size}], got {tuple(num_draft_tokens.shape)}")
    if batch_size and not bool(((num_draft_tokens >= 0) & (num_draft_tokens <= max_draft)).all()):
        raise ValueError(f"num_draft_tokens must lie in 0..{max_draft}, got {num_draft_tokens.tolist()}")
    if sampling.batch_size != batch_size or len(generators) != batch_size:
        raise ValueError(
            f"need {batch_size} sampling rows and generators: {sampling.batch_size}, {len(generators)}"
        )
    if draft_probs is None:
        if bool((~sampling.is_greedy.cpu() & (num_draft_tokens.cpu() > 0)).any()):
            raise ValueError("draft_probs may be None only when no sampled row has draft tokens")
    elif draft_probs.shape != (batch_size, max_draft, target_logits.shape[-1]):
        raise ValueError(
            f"draft_probs must be [{batch_size}, {max_draft}, V], got {tuple(draft_probs.shape)}"
        )
