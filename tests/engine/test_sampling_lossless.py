"""Sampling losslessness, end to end: with speculation, the generated tokens are distributed as the
target alone samples them.

A tiny target with a 16-token vocabulary makes the target-alone law computable exactly by
enumerating every continuation: the marginal of output position 0 and the joint law of the pairs
of positions (0, 1), (1, 2) and (2, 3). Thousands of sequences (one engine batch stream, one seed
each) are compared with it by chi-square. Pairs rather than single positions give the test power
against errors tied to the previous token (an n-gram draft depends on it). Position 0 comes from
the prefill; positions 1-3 come from drafted blocks: accepted, recovered or bonus tokens.

The negative controls break the rule on purpose (the recovered token drawn from target_probs
instead of the residual) and require the same test to reject, so a pass means something.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from dspark_ray.core import verification
from dspark_ray.core.sampling import SamplingParams, SamplingTensors, logits_to_probs
from dspark_ray.engine.sequence import GenerationRequest
from harness import make_drafter, make_engine
from tiny_models import build_draft, build_target

pytestmark = pytest.mark.engine

VOCAB_SIZE = 16
# The target's own greedy continuation of [6]: it holds the tokens the target likes, so the
# n-gram drafter proposes tokens of substantial target probability (and the controls have power).
PROMPT = [6, 7, 12, 15, 7, 4, 5, 11, 12, 12, 5, 7, 7]
NUM_POSITIONS = 4
NUM_SAMPLES = 3000
ALPHA = 1e-3  # every run is seeded, so a pass is reproducible; this guards against bad luck in new seeds
SAMPLINGS = {
    "temperature-1": SamplingParams(temperature=1.0),
    "temperature-0.7-top-k-top-p": SamplingParams(temperature=0.7, top_k=6, top_p=0.9),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vocab")
    target = build_target("llama", root / "target", vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                          initializer_range=0.3)
    return target, build_draft(target, root / "draft")


@pytest.fixture(scope="module")
def exact_laws(small) -> dict[str, list[torch.Tensor]]:
    return {name: target_alone_laws(small[0], PROMPT, params, NUM_POSITIONS) for name, params in SAMPLINGS.items()}


@torch.no_grad()
def target_alone_laws(target, prompt: list[int], params: SamplingParams, num_positions: int) -> list[torch.Tensor]:
    """Exact law of target-alone sampling: [V] marginal of position 0, then for j >= 1 the [V, V]
    joint of positions (j-1, j), by enumerating every continuation of positive probability."""
    vocab = target.config.vocab_size
    prefixes, mass = [[]], torch.ones(1, dtype=torch.float64)  # continuations so far and their probability
    laws = []
    for position in range(num_positions):
        logits = target(torch.tensor([prompt + prefix for prefix in prefixes])).logits[:, -1:]  # [N, 1, V]
        probs = logits_to_probs(logits, SamplingTensors.from_params([params] * len(prefixes)))[:, 0]  # [N, V]
        joint = mass[:, None] * probs.double()  # [N, V]
        if position == 0:
            laws.append(joint.sum(0))
        else:
            previous = torch.tensor([prefix[-1] for prefix in prefixes])
            laws.append(torch.zeros(vocab, vocab, dtype=torch.float64).index_add_(0, previous, joint))
        keep = (joint.flatten() > 0).nonzero()[:, 0]
        prefixes = [prefixes[i // vocab] + [i % vocab] for i in keep.tolist()]
        mass = joint.flatten()[keep]
    return laws


def observed_counts(outputs: torch.Tensor, position: int) -> torch.Tensor:  # [V] or [V, V]
    if position == 0:
        return torch.bincount(outputs[:, 0], minlength=VOCAB_SIZE)
    pairs = outputs[:, position - 1] * VOCAB_SIZE + outputs[:, position]
    return torch.bincount(pairs, minlength=VOCAB_SIZE ** 2).view(VOCAB_SIZE, VOCAB_SIZE)


def chi_square_pvalue(observed: torch.Tensor, law: torch.Tensor) -> float:
    """Goodness of fit; cells expecting fewer than 5 counts are pooled into one."""
    observed, expected = observed.flatten().double(), law.flatten() * observed.sum()
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    expected = expected * observed.sum() / expected.sum()  # exact totals for scipy
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def sample(small, drafter: str, params: SamplingParams, seed_base: int) -> tuple[torch.Tensor, float]:
    """NUM_SAMPLES outputs of NUM_POSITIONS tokens [M, 4], and the draft acceptance rate."""
    target, draft = small
    engine = make_engine(target, make_drafter(drafter, target, draft, 3), 3, max_batch_size=500)
    requests = [GenerationRequest(PROMPT, sampling=SamplingParams(**{**vars(params), "seed": seed_base + i}),
                                  max_tokens=NUM_POSITIONS) for i in range(NUM_SAMPLES)]
    seqs = engine.generate(requests)
    num_drafted = sum(seq.stats.num_draft_tokens for seq in seqs)
    acceptance = sum(seq.stats.num_accepted_tokens for seq in seqs) / max(1, num_drafted)
    return torch.tensor([seq.output_token_ids for seq in seqs]), acceptance


def p_values(outputs: torch.Tensor, laws: list[torch.Tensor]) -> list[float]:
    return [chi_square_pvalue(observed_counts(outputs, position), law) for position, law in enumerate(laws)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("drafter", ["none", "model-off", "ngram"])
def test_output_distribution_equals_target_alone(small, exact_laws, drafter, sampling):
    seed_base = 100_000 * (1 + ["none", "model-off", "ngram"].index(drafter)) + 10_000 * list(SAMPLINGS).index(sampling)
    outputs, acceptance = sample(small, drafter, SAMPLINGS[sampling], seed_base)
    laws = exact_laws[sampling]

    for position, law in enumerate(laws):  # never a token (or pair) the target rules out
        assert int(observed_counts(outputs, position)[law == 0].sum()) == 0, position
    p = p_values(outputs, laws)
    assert min(p) > ALPHA, f"p-values at positions 0..3: {p}"
    if drafter != "none":  # drafts were both accepted and rejected: every branch of the rule ran
        assert 0.1 < acceptance < 0.9, acceptance


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("drafter", ["model-off", "ngram"])
def test_negative_control_recovered_from_target_probs_is_rejected(small, exact_laws, monkeypatch, drafter, sampling):
    """A lossy rule (recovered token from target_probs, not the residual) must fail the same test."""
    monkeypatch.setattr(verification, "recovered_probs", lambda draft_probs, target_probs: target_probs)
    outputs, _ = sample(small, drafter, SAMPLINGS[sampling], seed_base=7_000_000)

    p = p_values(outputs, exact_laws[sampling])
    assert p[1] < 1e-4 and p[3] < 1e-4, f"p-values at positions 0..3: {p}"
