"""Sampling losslessness with the DSpark draft distribution: tokens generated with `--drafter dspark`
(temperature 1, drafts sampled from softmax(U_k + B_k) and verified against exactly that) follow the
target-alone distribution. Two-sample chi-square on the tokens at the first and the fourth drafted
positions (output positions 1 and 4), small vocabulary; a negative control whose drafts do not come
from the distribution it reports must be caught by the same test."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import chi2_contingency

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.drafters.base import DraftProposal, NoDrafter
from dspark_ray.engine.drafters.dspark import DSparkDrafter
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from tiny_dspark import build_tiny_dspark
from tiny_models import build_target

pytestmark = pytest.mark.engine

VOCAB_SIZE, NUM_SAMPLES, PROMPT, POSITIONS = 12, 2500, [3, 7, 5], (1, 4)


class MisreportingDrafter(DSparkDrafter):
    """Drafts the argmax but reports the full distribution it did not sample from: NOT lossless.
    (Claiming one-hot draft_probs would be no control: that rule happens to stay exact.)"""

    def propose(self, seqs, max_draft_tokens, time_budget_s=None) -> DraftProposal:
        proposal = super().propose(seqs, max_draft_tokens)
        if proposal.draft_probs is None:
            return proposal
        return replace(proposal, draft_token_ids=proposal.draft_probs.argmax(dim=-1))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vocab")
    target = build_target("llama", root / "target", seed=3, vocab_size=VOCAB_SIZE)
    drafter = build_tiny_dspark(target, root / "dspark", "gated", block_size=4, trained=False, seed=1)
    return target, drafter.model


def sample_tokens(target, drafter, seed_offset: int) -> torch.Tensor:
    """[NUM_SAMPLES, 5] generated tokens, one seeded request per row, all decoded as one batch."""
    layers = list(drafter.model.config.target_layer_ids) if isinstance(drafter, DSparkDrafter) else None
    runner = CausalLMRunner(target, 0, layers)
    engine = SpeculativeEngine(TargetVerifier(runner), drafter, StopRules(set(), 256), 4, NUM_SAMPLES)
    requests = [GenerationRequest(PROMPT, SamplingParams(temperature=1.0, seed=seed_offset + i), max_tokens=5)
                for i in range(NUM_SAMPLES)]
    return torch.tensor([seq.output_token_ids for seq in engine.generate(requests)])


def p_values(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    values = []
    for position in POSITIONS:
        counts = torch.stack([torch.bincount(x[:, position], minlength=VOCAB_SIZE) for x in (a, b)])
        counts = counts[:, counts.sum(0) > 0]
        values.append(float(chi2_contingency(counts.numpy())[1]))
    return values


def test_dspark_sampling_matches_target_alone_and_a_misreporting_drafter_is_caught(small_vocab):
    target, model = small_vocab
    target_alone = sample_tokens(target, NoDrafter(), seed_offset=10**6)
    with_dspark = sample_tokens(target, DSparkDrafter(model, 4), seed_offset=0)
    misreported = sample_tokens(target, MisreportingDrafter(model, 4), seed_offset=0)

    honest = p_values(with_dspark, target_alone)
    control = p_values(misreported, target_alone)
    assert min(honest) > 1e-3, honest
    assert max(control) < 1e-6, control
