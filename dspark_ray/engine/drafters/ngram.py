"""Prompt-lookup drafting: copy what followed the latest earlier occurrence of the context's tail.

No model. The draft distribution is one-hot on the copied token, which the speculative sampling
rule handles exactly (accept with probability target_prob(token)).
"""

from __future__ import annotations

import torch

from dspark_ray.engine.drafters.base import DraftProposal, TargetFeatures
from dspark_ray.engine.sequence import Sequence


def lookup_continuation(token_ids: list[int], max_ngram: int, min_ngram: int, num_tokens: int) -> list[int]:
    """Tokens that followed the most recent earlier match of the longest matching tail n-gram."""
    if num_tokens <= 0:
        return []
    for n in range(min(max_ngram, len(token_ids) - 1), min_ngram - 1, -1):
        tail = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start : start + n] == tail:
                return token_ids[start + n : start + n + num_tokens]
    return []


class NgramDrafter:
    def __init__(self, vocab_size: int, max_ngram: int = 4, min_ngram: int = 1) -> None:
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        pass

    def remove(self, seq_ids: list[int]) -> None:
        pass

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:  # drafts in a few forwards of its own: no time budget
        tokens = [lookup_continuation(seq.token_ids, self.max_ngram, self.min_ngram, budget)
                  for seq, budget in zip(seqs, max_draft_tokens)]
        if all(seq.request.sampling.is_greedy for seq in seqs):
            return DraftProposal.from_lists(tokens, None, self.vocab_size)
        probs = [[self._one_hot(token) for token in row] for row in tokens]
        return DraftProposal.from_lists(tokens, probs, self.vocab_size)

    def _one_hot(self, token: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(token), self.vocab_size).float()

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        pass
