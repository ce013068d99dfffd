"""DSpark drafting: one backbone forward per block, then the cheap sequential head token by token.

The drafter keeps, per sequence, the context keys/values of every token the target has cached,
computed from the target's captured layers (fed in `add` and `on_verified`) once per token: the
features wait (`PendingFeatures`) until the sequence next drafts, and a proposal projects those of
all its rows in one batch. While drafting is off (the load-aware governor, at high load) the
context therefore costs no projection. A proposal drafts up to `min(budget, block_size)` tokens
per sequence from `softmax(processed(U_k + B_k))`, processed by the same `logits_to_probs` as the target's
logits, and returns exactly those distributions with the tokens (greedy rows take the argmax of
`U_k + B_k`), plus the confidence head's logits.

The backbone runs only the block positions a step drafts (the most any of its rows drafts), not
the whole block: its cost grows with them, and at high load a short draft is what pays
(docs/design/reasons.md has the figures). Positions attend bidirectionally within the block, so a
cut block is a slightly different proposal, never a different output. A batch with a sampled row runs the whole block, so a sampled row's drafts,
and hence its seeded output, never depend on its neighbours' lengths (greedy rows' outputs are the
target's whatever they draft).

A sequence whose context is incomplete (the verifier captured no features) gets no drafts: it
decodes with the target alone, slower but identical.
"""

from __future__ import annotations

import torch

from dspark_ray.core.sampling import SamplingTensors
from dspark_ray.dspark.context_cache import ContextCache
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.dspark.pending_features import PendingFeatures
from dspark_ray.engine.drafters.base import (DraftProbsTransform, DraftProposal, TargetFeatures, choose_drafts,
                                               propose_ready)
from dspark_ray.engine.sequence import Sequence


class DSparkDrafter:
    def __init__(self, model: DSparkModel, num_speculative_tokens: int,
                 draft_probs_transform: DraftProbsTransform | None = None) -> None:
        self.model = model.eval()
        self.draft_probs_transform = draft_probs_transform
        self.max_draft_tokens = min(num_speculative_tokens, model.block_size)
        self.cache = ContextCache()  # projected context K/V
        self.pending = PendingFeatures()  # captured features of cached tokens, not yet projected
        self.vocab_size = model.config.target.vocab_size
        # Context tokens run through the K/V projections, one entry per proposal that projected any
        # (tests check that each token is processed once).
        self.num_context_tokens_processed: list[int] = []

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        for seq in seqs:
            self.cache.add(seq.seq_id)
        self._extend(seqs, target_features)

    def remove(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.cache.remove(seq_id)
            self.pending.remove(seq_id)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        self._extend([seq for seq in seqs if seq.seq_id in self.cache], target_features)

    def _extend(self, seqs: list[Sequence], target_features: TargetFeatures | None) -> None:
        """Keep the features of newly cached tokens (projected when the sequence next drafts), then
        roll back to the committed tokens: the context holds all of them but the last (the next
        anchor)."""
        self.pending.append_captured(target_features, [seq.seq_id for seq in seqs])
        for seq in seqs:
            self._truncate(seq.seq_id, seq.num_tokens - 1)

    def _truncate(self, seq_id: int, num_tokens: int) -> None:
        projected = self.cache.length(seq_id)
        self.cache.truncate(seq_id, num_tokens)
        self.pending.truncate(seq_id, max(0, num_tokens - projected))

    def context(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences' context K/V, padded, and its validity mask (their pending features projected)."""
        self._project_pending(seqs)
        return self.cache.batch([seq.seq_id for seq in seqs])

    @torch.no_grad()
    def _project_pending(self, seqs: list[Sequence]) -> None:
        """Append the K/V of the sequences' pending features, in one batched projection."""
        taken = [(seq.seq_id, self.pending.take(seq.seq_id)) for seq in seqs]
        taken = [(seq_id, features) for seq_id, features in taken if features is not None]
        if not taken:
            return
        starts = [self.cache.length(seq_id) for seq_id, _ in taken]
        positions = torch.cat([torch.arange(start, start + len(features))
                               for start, (_, features) in zip(starts, taken)])
        device = self.model.mask_embedding.device
        features = torch.cat([features for _, features in taken]).to(device)
        entries = self.model.context_kv(features, positions.to(device))  # [N, layers, 2, D]
        for (seq_id, _), chunk in zip(taken, entries.split([len(features) for _, features in taken])):
            self.cache.append(seq_id, chunk)
        self.num_context_tokens_processed.append(len(positions))

    def _ready(self, seq: Sequence) -> bool:
        if seq.seq_id not in self.cache:
            return False
        return self.cache.length(seq.seq_id) + self.pending.length(seq.seq_id) == seq.num_tokens - 1

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:  # drafts in a few forwards of its own: no time budget
        return propose_ready(seqs, max_draft_tokens, self.max_draft_tokens, self._ready, self._draft)

    def _draft(self, seqs: list[Sequence], budgets: list[int]) -> DraftProposal:
        device = self.model.mask_embedding.device
        context_kv, valid = self.context(seqs)  # [b, S, layers, 2, D], [b, S]
        anchors = torch.tensor([seq.token_ids[-1] for seq in seqs], device=device)  # [b]
        anchor_positions = torch.tensor([seq.num_tokens - 1 for seq in seqs], device=device)  # [b]
        sampling = SamplingTensors.from_params([seq.request.sampling for seq in seqs])
        any_sampled = not bool(sampling.is_greedy.all())
        width = max(budgets)
        # Only the positions drafted, unless a row samples (module docstring).
        num_positions = self.model.block_size if any_sampled else width
        block = self.model(anchors[:, None], anchor_positions[:, None], context_kv, valid[:, None], num_positions)
        hidden, base_logits = block.hidden[:, 0], block.base_logits[:, 0]  # [b, positions, D], [b, positions, V]
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        confidence = torch.zeros(len(seqs), width)
        draft_probs = torch.zeros(len(seqs), width, self.vocab_size) if any_sampled else None
        prev, state = anchors, self.model.initial_head_state(len(seqs))
        for k in range(width):  # only the cheap head runs sequentially
            logits, confidence[:, k], state = self.model.head_step(hidden[:, k], base_logits[:, k], prev, state)
            chosen, probs = choose_drafts(logits, sampling, seqs, budgets, k, self.draft_probs_transform)  # [b], [b, V]
            if probs is not None:
                draft_probs[:, k] = probs.cpu()
            tokens[:, k] = chosen.cpu()
            prev = chosen
        return DraftProposal(tokens, torch.tensor(budgets), draft_probs, confidence)

