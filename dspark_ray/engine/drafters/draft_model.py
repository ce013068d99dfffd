"""Classic speculative drafting with an independent small LM sharing the target's vocabulary.

Drafts autoregressively, batched over sequences, from the draft LM's own KV cache; after
verification the cache is rolled back to the longest prefix the target kept. The draft length
adapts per sequence ('confidence': stop once the draft doubts its own token; 'heuristic': HF's
+2/-1 schedule; 'off': fixed).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from dspark_ray.core.sampling import SamplingTensors, sample_from_probs
from dspark_ray.engine.drafters.base import DraftProbsTransform, DraftProposal, TargetFeatures, draft_distributions
from dspark_ray.engine.loading import context_limit
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import Sequence


class DraftModelDrafter:
    def __init__(self, model: PreTrainedModel, num_speculative_tokens: int, adaptive: str = "confidence",
                 confidence_threshold: float = 0.3, pad_token_id: int = 0,
                 draft_probs_transform: DraftProbsTransform | None = None) -> None:
        self.runner = CausalLMRunner(model, pad_token_id)
        self.draft_probs_transform = draft_probs_transform
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_position = context_limit(model)
        self.num_speculative_tokens = num_speculative_tokens
        self.adaptive = adaptive
        self.confidence_threshold = confidence_threshold
        self.draft_length: dict[int, int] = {}  # per-sequence length for the 'heuristic' schedule

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        fits = [seq for seq in seqs if seq.num_tokens < self.max_position]
        if fits:
            self.runner.add({seq.seq_id: seq.token_ids[:-1] for seq in fits})
        for seq in seqs:
            self.draft_length[seq.seq_id] = self.num_speculative_tokens

    def remove(self, seq_ids: list[int]) -> None:
        self.runner.remove(seq_ids)
        for seq_id in seq_ids:
            self.draft_length.pop(seq_id, None)

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int]) -> DraftProposal:
        budgets = [self._budget(seq, limit) for seq, limit in zip(seqs, max_draft_tokens)]
        sampling = SamplingTensors.from_params([seq.request.sampling for seq in seqs])
        any_sampled = not bool(sampling.is_greedy.all())
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        feed = {seq.seq_id: self.runner.uncached_suffix(seq.seq_id, seq.token_ids)
                for seq, budget in zip(seqs, budgets) if budget > 0}
        while feed:
            logits = self._last_logits(feed, seqs)  # [B, V]
            draft_probs = draft_distributions(logits, sampling, self.draft_probs_transform)  # [B, V]
            chosen = self._choose(draft_probs, logits, sampling, seqs, feed)  # [B]
            confidence = torch.softmax(logits, -1).gather(1, chosen[:, None])[:, 0]  # [B]
            next_feed = {}
            for row, seq in enumerate(seqs):
                if seq.seq_id not in feed:
                    continue
                tokens[row].append(int(chosen[row]))
                if any_sampled:
                    probs[row].append(draft_probs[row])
                if len(tokens[row]) < budgets[row] and self._confident(float(confidence[row])):
                    next_feed[seq.seq_id] = [int(chosen[row])]
            feed = next_feed
        return DraftProposal.from_lists(tokens, probs if any_sampled else None, self.vocab_size)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        self.runner.sync({seq.seq_id: seq.token_ids for seq in seqs if seq.seq_id in self.runner.seq_ids})
        if self.adaptive == "heuristic":
            for seq, drafted, accepted in zip(seqs, num_drafted, num_accepted):
                length = self.draft_length[seq.seq_id]
                self.draft_length[seq.seq_id] = length + 2 if drafted and accepted == drafted else max(1, length - 1)

    def _budget(self, seq: Sequence, limit: int) -> int:
        if seq.seq_id not in self.runner.seq_ids:
            return 0
        room = self.max_position - seq.num_tokens + 1  # the draft LM's own context limit
        schedule = self.draft_length[seq.seq_id] if self.adaptive == "heuristic" else self.num_speculative_tokens
        return max(0, min(limit, room, schedule))

    def _confident(self, confidence: float) -> bool:
        return self.adaptive != "confidence" or confidence >= self.confidence_threshold

    def _last_logits(self, feed: dict[int, list[int]], seqs: list[Sequence]) -> torch.Tensor:
        logits = self.runner.forward(feed)  # [R, T, V] in runner order
        rows = [self.runner.seq_ids.index(seq.seq_id) if seq.seq_id in feed else 0 for seq in seqs]
        last = [len(feed[seq.seq_id]) - 1 if seq.seq_id in feed else 0 for seq in seqs]
        return logits[torch.tensor(rows), torch.tensor(last)]

    @staticmethod
    def _choose(draft_probs: torch.Tensor, logits: torch.Tensor, sampling: SamplingTensors,
                seqs: list[Sequence], feed: dict[int, list[int]]) -> torch.Tensor:
        """Greedy rows take the argmax; sampled rows that are drafting draw from their own RNG
        (only those, so a sequence's randomness never depends on its batch neighbours)."""
        chosen = logits.argmax(-1)  # [B]
        for row, seq in enumerate(seqs):
            if seq.seq_id in feed and not seq.request.sampling.is_greedy:
                chosen[row] = sample_from_probs(draft_probs[row : row + 1], [seq.generator])[0]
        return chosen
