"""Sampling stays lossless with confidence-scheduled verification, end to end, when the confidence
of draft k depends on the drafted token x_{k-1} (as DSpark's head does): the scheduler's decision
to verify x_j may look at x_{<j} but never at x_j. Same exact target-alone law and chi-square test
as test_sampling_lossless; the negative control peeks at x_j (verifies it only when the next
confidence is high) and must be rejected."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dspark_ray.core.scheduling import SpsCurve
from dspark_ray.engine.drafters.scheduled import ConfidenceScheduledDrafter, truncate_proposal
from dspark_ray.engine.sequence import GenerationRequest
from harness import ConfidenceOverlay, make_drafter, make_engine
from test_sampling_lossless import (
    ALPHA,
    NUM_POSITIONS,
    PROMPT,
    SAMPLINGS,
    exact_laws,  # noqa: F401 (fixture)
    observed_counts,
    p_values,
    small,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.engine

NUM_SAMPLES = 3000
K = 3
# Moderately loaded: with ~500 rows per step, a draft is worth verifying if its survival is above
# roughly a third to a half, so lengths differ per row and step.
CURVE = SpsCurve.linear(1.0, 0.001, max_tokens=4096)


class PrefixConfidence(ConfidenceOverlay):
    """Draft LM proposals plus confidence logits that depend on the previous token only."""

    def confidence_logits(self, previous, positions):
        return torch.where(previous % 3 == 0, -2.0, 2.0)  # [B, K]


class PeekingScheduler(PrefixConfidence):
    """LOSSY on purpose: verifies x_j only while the confidence of j+1 (a function of x_j) is high."""

    def propose(self, seqs, max_draft_tokens, time_budget_s=None):
        proposal = super().propose(seqs, max_draft_tokens)
        width = proposal.draft_token_ids.shape[1]
        next_high = torch.cat([proposal.confidence_logits[:, 1:], torch.full((len(seqs), 1), -2.0)], 1)[:, :width] > 0
        keep = next_high.long().cumprod(1).sum(1)  # [B]
        return truncate_proposal(proposal, keep)


def sample(small, drafter, params, seed_base):  # noqa: F811
    target, _ = small
    engine = make_engine(target, drafter, K, max_batch_size=500)
    requests = [GenerationRequest(PROMPT, sampling=dataclasses.replace(params, seed=seed_base + i),
                                  max_tokens=NUM_POSITIONS) for i in range(NUM_SAMPLES)]
    seqs = engine.generate(requests)
    drafted = sum(seq.stats.num_draft_tokens for seq in seqs)
    return torch.tensor([seq.output_token_ids for seq in seqs]), drafted, sum(seq.stats.num_accepted_tokens for seq in seqs)


def test_scheduled_sampling_equals_target_alone(small, exact_laws):  # noqa: F811
    target, draft = small
    inner = make_drafter("model-off", target, draft, K)
    scheduled = ConfidenceScheduledDrafter(PrefixConfidence(inner), CURVE, padded=False)
    outputs, drafted, accepted = sample(small, scheduled, SAMPLINGS["temperature-1"], seed_base=5_000_000)
    laws = exact_laws["temperature-1"]
    for position, law in enumerate(laws):
        assert int(observed_counts(outputs, position)[law == 0].sum()) == 0, position
    p = p_values(outputs, laws)
    assert min(p) > ALPHA, f"p-values at positions 0..3: {p}"
    proposed = NUM_SAMPLES * K * (NUM_POSITIONS - 1)  # upper bound on drafts proposed
    assert 0.1 * proposed < drafted < 0.9 * proposed  # the scheduler cut drafts, and not all of them
    assert 0 < accepted < drafted


def test_negative_control_peeking_at_the_drafted_token_is_rejected(small, exact_laws):  # noqa: F811
    target, draft = small
    peeking = PeekingScheduler(make_drafter("model-off", target, draft, K))
    outputs, _, _ = sample(small, peeking, SAMPLINGS["temperature-1"], seed_base=6_000_000)
    p = p_values(outputs, exact_laws["temperature-1"])
    assert min(p[1:]) < 1e-4, f"p-values at positions 0..3: {p}"
