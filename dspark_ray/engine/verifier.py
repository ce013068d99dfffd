"""The target side of a step: score drafts with ONE target forward and apply the lossless rule.

`TargetVerifier` is the in-process implementation; the serving layer puts a remote proxy with the
same verbs in front of a tensor-parallel target. It knows nothing about stop rules: the caller
commits what it keeps and then calls `sync` so the cache matches the committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from dspark_ray.core.sampling import SamplingTensors
from dspark_ray.core.verification import VerificationResult, verify, verify_greedy
from dspark_ray.engine.drafters.base import DraftProposal, TargetFeatures
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import Sequence


@dataclass(frozen=True, eq=False)
class VerifyOutput:
    result: VerificationResult
    # Captured target layers (DSpark) for the tokens this forward cached and kept: the fed
    # committed tokens and the accepted drafts, in order. None when no layers are captured.
    target_features: TargetFeatures | None = None


@dataclass(frozen=True, eq=False)
class DraftScores:
    target_logits: torch.Tensor  # [B, K+1, V]: position j scores draft j, the last one the bonus
    num_fed_committed: list[int]  # [B] committed tokens fed before the drafts
    prompt_logits: torch.Tensor | None = None  # [N, V] after each prompt prefilled in the same forward


class Verifier(Protocol):
    fused_prompt_limit: int  # the longest prompt `verify_and_add` prefills in the verification's forward

    def add(self, seqs: list[Sequence]) -> VerifyOutput:
        """Prefill prompts; the result holds each sequence's first token (an empty-draft verification)."""

    def resume(self, seqs: list[Sequence]) -> TargetFeatures | None:
        """Cache the committed tokens of replayed sequences (`GenerationRequest.num_resumed_tokens`)
        but the last, as after a step, and draw nothing: their next step verifies from there, as in
        the run they continue. Returns the captured layers of the cached tokens (DSpark) or None."""

    def verify(self, seqs: list[Sequence], proposal: DraftProposal) -> VerifyOutput:
        """Score each sequence's drafts after its committed tokens and decide what to keep."""

    def verify_and_add(self, seqs: list[Sequence], proposal: DraftProposal, admitted: list[Sequence]
                       ) -> tuple[VerifyOutput, VerifyOutput | None]:
        """`verify(seqs, proposal)` and `add(admitted)` (None when `admitted` is empty), in one target
        forward where the verifier can."""

    def sync(self, seqs: list[Sequence]) -> None:
        """Roll caches back to the committed tokens of `seqs`."""

    def remove(self, seq_ids: list[int]) -> None:
        """Free the caches of finished sequences."""


class TargetVerifier:
    def __init__(self, runner: CausalLMRunner) -> None:
        self.runner = runner

    @property
    def fused_prompt_limit(self) -> int:
        return self.runner.fused_prompt_limit

    def add(self, seqs: list[Sequence]) -> VerifyOutput:
        logits = self.prefill(seqs)  # [N, V]
        return self._first_tokens(seqs, logits, first_row=0)

    def resume(self, seqs: list[Sequence]) -> TargetFeatures | None:
        self.runner.add({seq.seq_id: seq.token_ids[:-1] for seq in seqs})
        return self._features(seqs, [seq.num_tokens - 1 for seq in seqs])

    def verify(self, seqs: list[Sequence], proposal: DraftProposal) -> VerifyOutput:
        return self.verify_and_add(seqs, proposal, [])[0]

    def verify_and_add(self, seqs: list[Sequence], proposal: DraftProposal, admitted: list[Sequence]
                       ) -> tuple[VerifyOutput, VerifyOutput | None]:
        """One forward: the drafts of `seqs` after their committed tokens, and the prompts of
        `admitted` (a mixed batch, the way vLLM's scheduler puts prefills beside decodes). A
        forward's cost on a small target is mostly per layer, not per token: prefilled on its own,
        one prompt cost about a whole verification step of 16 sequences."""
        scores = self.score(seqs, proposal, admitted)
        result = _verify(seqs, proposal, scores.target_logits)
        added = self._first_tokens(admitted, scores.prompt_logits, first_row=len(seqs)) if admitted else None
        if self.runner.last_features is None:
            return VerifyOutput(result), added
        kept = [fed + accepted for fed, accepted in zip(scores.num_fed_committed, result.num_accepted.tolist())]
        return VerifyOutput(result, self._features(seqs, kept)), added

    # The forward halves of add and verify: tensor-parallel ranks other than 0 run only these,
    # in lockstep with rank 0, which also applies the rule.

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Cache the prompts; logits after each one's last token. # [N, V]"""
        return self.runner.add({seq.seq_id: seq.request.prompt_token_ids for seq in seqs})

    def score(self, seqs: list[Sequence], proposal: DraftProposal, admitted: list[Sequence] = ()) -> DraftScores:
        """Logits of the drafts of `seqs`, and (in the same forward) after the prompts of `admitted`."""
        if admitted:
            self.runner.join([seq.seq_id for seq in admitted])
        suffixes = [self.runner.uncached_suffix(seq.seq_id, seq.token_ids) for seq in seqs]
        feed = {seq.seq_id: suffix + proposal.drafts(row) for row, (seq, suffix) in enumerate(zip(seqs, suffixes))}
        feed.update({seq.seq_id: seq.request.prompt_token_ids for seq in admitted})
        logits = self.runner.forward(feed)  # [B + N, T, V] in the order of seqs, then admitted
        return DraftScores(_draft_logits(logits[:len(seqs)], suffixes, proposal.draft_token_ids.shape[1]),
                           [len(suffix) for suffix in suffixes],
                           _after_prompts(logits[len(seqs):], admitted) if admitted else None)

    def _first_tokens(self, seqs: list[Sequence], logits: torch.Tensor, first_row: int) -> VerifyOutput:
        """The prefill's verdict (an empty-draft verification of the logits after each prompt,
        `[N, V]`), with the prompts' captured layers from row `first_row` of the last forward."""
        result = _verify(seqs, DraftProposal.empty(len(seqs)), logits[:, None])
        num_kept = [len(seq.request.prompt_token_ids) for seq in seqs]
        return VerifyOutput(result, self._features(seqs, num_kept, first_row))

    def _features(self, seqs: list[Sequence], num_kept: list[int], first_row: int = 0) -> TargetFeatures | None:
        features = self.runner.last_features  # [rows, T, L*H] in the order of the last forward's feed
        if features is None:
            return None
        return {seq.seq_id: features[first_row + row, :kept]
                for row, (seq, kept) in enumerate(zip(seqs, num_kept))}

    def sync(self, seqs: list[Sequence]) -> None:
        self.runner.sync({seq.seq_id: seq.token_ids for seq in seqs})

    def remove(self, seq_ids: list[int]) -> None:
        self.runner.remove(seq_ids)


def _draft_logits(logits: torch.Tensor, suffixes: list[list[int]], max_draft: int) -> torch.Tensor:
    """`[B, T, V]` logits of rows fed `suffixes[b]` then their drafts -> `[B, K+1, V]` from each
    row's last committed token on. In the steady state every row was fed one committed token and
    T = K + 1, so that is `logits` itself, with no gather."""
    if logits.shape[1] == max_draft + 1 and all(len(suffix) == 1 for suffix in suffixes):
        return logits
    rows = torch.arange(len(suffixes))  # [B]
    first = torch.tensor([len(suffix) - 1 for suffix in suffixes], dtype=torch.long)  # [B]: after the last committed token
    positions = first[:, None] + torch.arange(max_draft + 1)[None, :]  # [B, K+1]
    return logits[rows[:, None], positions.clamp(max=logits.shape[1] - 1)]  # [B, K+1, V]


def _after_prompts(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`[N, T, V]` logits of prompt rows -> `[N, V]` after each prompt's last token."""
    ends = torch.tensor([len(seq.request.prompt_token_ids) - 1 for seq in seqs], dtype=torch.long)
    return logits[torch.arange(len(seqs)), ends]


def _verify(seqs: list[Sequence], proposal: DraftProposal, target_logits: torch.Tensor) -> VerificationResult:
    device = target_logits.device  # drafts are built on the CPU; the rule runs where the logits are
    if all(seq.request.sampling.is_greedy for seq in seqs):  # no sampling tensors, no probabilities
        return verify_greedy(proposal.draft_token_ids, proposal.num_draft_tokens, target_logits)
    draft_probs = None if proposal.draft_probs is None else proposal.draft_probs.to(device)
    if draft_probs is None and proposal.draft_token_ids.shape[1] == 0:
        draft_probs = target_logits.new_zeros(len(seqs), 0, target_logits.shape[-1])  # [B, 0, V]
    return verify(
        proposal.draft_token_ids.to(device), proposal.num_draft_tokens.to(device), draft_probs, target_logits,
        SamplingTensors.from_params([seq.request.sampling for seq in seqs]),
        [seq.generator for seq in seqs],
    )
