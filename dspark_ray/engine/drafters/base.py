"""The drafter contract: propose drafts for a batch, then hear what the target kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dspark_ray.core.sampling import SamplingTensors, logits_to_probs, sample_from_probs
from dspark_ray.engine.sequence import Sequence

TargetFeatures = dict[int, torch.Tensor]  # seq_id -> [N, L*H] captured target states of newly cached tokens
# Maps processed draft distributions [B, V] to the ones drafts are sampled from (and reported in the
# proposal); the serving layer rounds them to what it can send exactly (`codec.quantize`).
DraftProbsTransform = Callable[[torch.Tensor], torch.Tensor]


def draft_distributions(logits: torch.Tensor, sampling: SamplingTensors,
                        transform: DraftProbsTransform | None) -> torch.Tensor:  # [B, V] -> [B, V]
    """What a drafting step samples from: the logits processed like the target's, then `transform`."""
    probs = logits_to_probs(logits[:, None], sampling)[:, 0]
    return probs if transform is None else transform(probs)


def choose_drafts(logits: torch.Tensor, sampling: SamplingTensors, seqs: list[Sequence], budgets: list[int],
                  position: int, transform: DraftProbsTransform | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafts at block `position` from `logits` `[b, V]`: greedy rows take the argmax; a sampled
    row still drafting (`position < budgets[row]`) draws from its own generator (only those, so a
    sequence's RNG never depends on its neighbours). Returns the tokens `[b]` and the distributions
    drawn from `[b, V]` (None when no row samples)."""
    chosen = logits.argmax(dim=-1)
    if bool(sampling.is_greedy.all()):
        return chosen, None
    probs = draft_distributions(logits, sampling, transform)
    for row, seq in enumerate(seqs):
        if not seq.request.sampling.is_greedy and position < budgets[row]:
            chosen[row] = sample_from_probs(probs[row : row + 1], [seq.generator])[0]
    return chosen, probs


def propose_ready(seqs: list[Sequence], max_draft_tokens: list[int], most: int, ready: Callable[[Sequence], bool],
                  draft: Callable[[list[Sequence], list[int]], DraftProposal]) -> DraftProposal:
    """`draft(rows, budgets)` for the sequences that are `ready` and may draft (up to `most` each),
    placed back among `seqs`; the others draft nothing."""
    budgets = [min(limit, most) if ready(seq) else 0 for seq, limit in zip(seqs, max_draft_tokens)]
    rows = [row for row, budget in enumerate(budgets) if budget > 0]
    if not rows:
        return DraftProposal.empty(len(seqs))
    return draft([seqs[row] for row in rows], [budgets[row] for row in rows]).scatter(rows, len(seqs))


@dataclass(frozen=True)
class DraftProposal:
    draft_token_ids: torch.Tensor  # [B, K] int64, padded past num_draft_tokens
    num_draft_tokens: torch.Tensor  # [B] int64
    draft_probs: torch.Tensor | None  # [B, K, V] float32: the distributions drafts were sampled from
    # Logits of the drafter's per-position acceptance estimates (DSpark's confidence head), before
    # calibration; None for drafters without one.
    confidence_logits: torch.Tensor | None = None  # [B, K] float32

    def drafts(self, row: int) -> list[int]:
        return self.draft_token_ids[row, : int(self.num_draft_tokens[row])].tolist()

    def select(self, rows: list[int]) -> "DraftProposal":
        """The proposal of `rows` only, in that order."""
        index = torch.tensor(rows, dtype=torch.long)
        draft_probs = None if self.draft_probs is None else self.draft_probs[index]
        confidence_logits = None if self.confidence_logits is None else self.confidence_logits[index]
        return DraftProposal(self.draft_token_ids[index], self.num_draft_tokens[index], draft_probs,
                             confidence_logits)

    def scatter(self, rows: list[int], batch_size: int) -> "DraftProposal":
        """This proposal of `rows` placed into one of `batch_size` rows; the others draft nothing."""
        if rows == list(range(batch_size)):
            return self
        index = torch.tensor(rows, dtype=torch.long)
        num_draft_tokens = torch.zeros(batch_size, dtype=torch.long)
        num_draft_tokens[index] = self.num_draft_tokens
        return DraftProposal(_scatter(self.draft_token_ids, index, batch_size), num_draft_tokens,
                             _scatter(self.draft_probs, index, batch_size),
                             _scatter(self.confidence_logits, index, batch_size))

    @classmethod
    def empty(cls, batch_size: int) -> "DraftProposal":
        return cls(torch.zeros(batch_size, 0, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long), None)

    @classmethod
    def from_lists(cls, tokens: list[list[int]], probs: list[list[torch.Tensor]] | None,
                   vocab_size: int) -> "DraftProposal":
        """Pad ragged per-sequence drafts (and their [V] distributions) into batch tensors."""
        width = max((len(row) for row in tokens), default=0)
        token_ids = torch.zeros(len(tokens), width, dtype=torch.long)
        for row, row_tokens in enumerate(tokens):
            token_ids[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        draft_probs = None
        if probs is not None:
            draft_probs = torch.zeros(len(tokens), width, vocab_size)
            for row, row_probs in enumerate(probs):
                if row_probs:
                    draft_probs[row, : len(row_probs)] = torch.stack(row_probs)
        num_draft_tokens = torch.tensor([len(row) for row in tokens], dtype=torch.long)
        return cls(token_ids, num_draft_tokens, draft_probs)


def _scatter(rows: torch.Tensor | None, index: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """`rows` [b, ...] at `index` [b] of zeros [batch_size, ...]."""
    if rows is None:
        return None
    whole = rows.new_zeros(batch_size, *rows.shape[1:])
    whole[index] = rows
    return whole


class Drafter(Protocol):
    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        """Start tracking new sequences (their prompt and first output token are committed)."""

    def remove(self, seq_ids: list[int]) -> None:
        """Forget finished sequences and free their state."""

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        """Draft up to max_draft_tokens[b] tokens after each sequence's committed tokens.

        `time_budget_s`: a drafter that drafts token by token stops greedy rows where another forward
        would end past this many seconds (each keeps at least its first draft); sampled rows ignore
        it, so their random draws never depend on timing. Others may ignore it: drafts are only
        ever fewer, and any drafts leave the output unchanged."""

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        """The target kept num_accepted[b] of num_drafted[b]; seqs already hold the new tokens."""


class NoDrafter:
    """Target-only decoding through the same engine: every step verifies an empty draft."""

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        pass

    def remove(self, seq_ids: list[int]) -> None:
        pass

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        return DraftProposal.empty(len(seqs))

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        pass
