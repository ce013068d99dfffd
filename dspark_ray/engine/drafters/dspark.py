"""DSpark drafting: one backbone forward per block, then the cheap sequential head token by token.

The drafter keeps, per sequence, the context keys/values of every token the target has cached
(fed from the target's captured layers in `add` and `on_verified`), so each step processes only
the newly accepted tokens. A proposal drafts up to `min(budget, block_size)` tokens per sequence
from `softmax(processed(U_k + B_k))`, processed by the same `logits_to_probs` as the target's
logits, and returns exactly those distributions with the tokens (greedy rows take the argmax of
`U_k + B_k`), plus the confidence head's logits.

A sequence whose context is incomplete (the verifier captured no features) gets no drafts: it
decodes with the target alone, slower but identical.
"""

from __future__ import annotations

import torch

from dspark_ray.core.sampling import SamplingTensors, sample_from_probs
from dspark_ray.dspark.context_cache import ContextCache
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.engine.drafters.base import DraftProbsTransform, DraftProposal, TargetFeatures, draft_distributions
from dspark_ray.engine.sequence import Sequence


class DSparkDrafter:
    def __init__(self, model: DSparkModel, num_speculative_tokens: int,
                 draft_probs_transform: DraftProbsTransform | None = None) -> None:
        self.model = model.eval()
        self.draft_probs_transform = draft_probs_transform
        self.max_draft_tokens = min(num_speculative_tokens, model.block_size)
        self.cache = ContextCache()
        self.vocab_size = model.config.target.vocab_size
        # Context tokens run through the K/V projections, one entry per add/on_verified call (tests
        # check that only new tokens are processed).
        self.num_context_tokens_processed: list[int] = []

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        for seq in seqs:
            self.cache.add(seq.seq_id)
        self._extend(seqs, target_features)

    def remove(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.cache.remove(seq_id)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        self._extend([seq for seq in seqs if seq.seq_id in self.cache], target_features)

    @torch.no_grad()
    def _extend(self, seqs: list[Sequence], target_features: TargetFeatures | None) -> None:
        """Append the K/V of newly cached tokens (one batched projection), then roll back to the
        committed tokens: entries exist for all of them but the last (the next anchor)."""
        fed = [seq for seq in seqs if target_features and seq.seq_id in target_features]
        if fed:
            features = [target_features[seq.seq_id] for seq in fed]  # each [N_b, L*E]
            starts = [self.cache.length(seq.seq_id) for seq in fed]
            positions = torch.cat([torch.arange(start, start + len(f)) for start, f in zip(starts, features)])
            device = self.model.mask_embedding.device
            entries = self.model.context_kv(torch.cat(features).to(device), positions.to(device))  # [N, layers, 2, D]
            for seq, chunk in zip(fed, entries.split([len(f) for f in features])):
                self.cache.append(seq.seq_id, chunk)
            self.num_context_tokens_processed.append(len(positions))
        for seq in seqs:
            self.cache.truncate(seq.seq_id, seq.num_tokens - 1)

    def _ready(self, seq: Sequence) -> bool:
        return seq.seq_id in self.cache and self.cache.length(seq.seq_id) == seq.num_tokens - 1

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:  # drafts in a few forwards of its own: no time budget
        budgets = [min(limit, self.max_draft_tokens) if self._ready(seq) else 0
                   for seq, limit in zip(seqs, max_draft_tokens)]
        rows = [row for row, budget in enumerate(budgets) if budget > 0]
        if not rows:
            return DraftProposal.empty(len(seqs))
        active = [seqs[row] for row in rows]
        draft = self._draft(active, [budgets[row] for row in rows])
        return _scatter_rows(draft, rows, budgets, len(seqs), self.vocab_size)

    def _draft(self, seqs: list[Sequence], budgets: list[int]) -> DraftProposal:
        device = self.model.mask_embedding.device
        context_kv, valid = self.cache.batch([seq.seq_id for seq in seqs])  # [b, S, layers, 2, D], [b, S]
        anchors = torch.tensor([seq.token_ids[-1] for seq in seqs], device=device)  # [b]
        anchor_positions = torch.tensor([seq.num_tokens - 1 for seq in seqs], device=device)  # [b]
        block = self.model(anchors[:, None], anchor_positions[:, None], context_kv, valid[:, None])
        hidden, base_logits = block.hidden[:, 0], block.base_logits[:, 0]  # [b, K, D], [b, K, V]

        sampling = SamplingTensors.from_params([seq.request.sampling for seq in seqs])
        any_sampled = not bool(sampling.is_greedy.all())
        width = max(budgets)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        confidence = torch.zeros(len(seqs), width)
        draft_probs = torch.zeros(len(seqs), width, self.vocab_size) if any_sampled else None
        prev, state = anchors, self.model.initial_head_state(len(seqs))
        for k in range(width):  # only the cheap head runs sequentially
            logits, confidence[:, k], state = self.model.head_step(hidden[:, k], base_logits[:, k], prev, state)
            chosen = logits.argmax(dim=-1)  # [b]
            if any_sampled:
                probs = draft_distributions(logits, sampling, self.draft_probs_transform)  # [b, V]
                draft_probs[:, k] = probs.cpu()
                for row, seq in enumerate(seqs):
                    # Only rows still drafting draw, so a sequence's RNG never depends on its neighbours.
                    if not seq.request.sampling.is_greedy and k < budgets[row]:
                        chosen[row] = sample_from_probs(probs[row : row + 1], [seq.generator])[0]
            tokens[:, k] = chosen.cpu()
            prev = chosen
        return DraftProposal(tokens, torch.tensor(budgets), draft_probs, confidence)


def _scatter_rows(draft: DraftProposal, rows: list[int], budgets: list[int], batch_size: int,
                  vocab_size: int) -> DraftProposal:
    """Place the drafts of the drafting rows into a proposal for the whole batch."""
    width = draft.draft_token_ids.shape[1]
    if rows == list(range(batch_size)):
        return draft
    index = torch.tensor(rows)
    tokens = torch.zeros(batch_size, width, dtype=torch.long)
    tokens[index] = draft.draft_token_ids
    confidence = torch.zeros(batch_size, width)
    confidence[index] = draft.confidence_logits
    draft_probs = None
    if draft.draft_probs is not None:
        draft_probs = torch.zeros(batch_size, width, vocab_size)
        draft_probs[index] = draft.draft_probs
    return DraftProposal(tokens, torch.tensor(budgets), draft_probs, confidence)
