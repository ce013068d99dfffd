"""Look-ahead drafting (within-request pipelining) of the draft-LM drafter: drafting past a proposal
while the target verifies it never changes the output, and a look-ahead is reused exactly when
verification commits what it assumed.

The engine here calls `look_ahead` right after each proposal (a draft worker does it while the
target verifies), with `should_stop` as given.
"""

from __future__ import annotations

import pytest

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.drafters.draft_model import DraftModelDrafter
from dspark_ray.engine.sequence import GenerationRequest
from harness import make_drafter, make_engine
from test_greedy_identity import MAX_TOKENS, PROMPTS, assert_matches_target_alone
from tiny_models import ARCHITECTURES


def looking_ahead(engine, should_stop=lambda: False):
    """`engine` with a look-ahead after every proposal; returns it."""
    propose = engine.propose

    def propose_then_look_ahead(seqs, draft_limit=None):
        proposal = propose(seqs, draft_limit)
        engine.drafter.look_ahead(seqs, should_stop)
        return proposal

    engine.propose = propose_then_look_ahead
    return engine


def greedy_requests():
    return [GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)]


@pytest.mark.parametrize("drafter", ["model-off", "model-confidence", "model-heuristic"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_look_ahead_output_equals_target_alone(tiny, reference, arch, drafter):
    models = tiny(arch)
    engine = looking_ahead(make_engine(models.target, make_drafter(drafter, models.target, models.draft, 3), 3))

    seqs = engine.generate(greedy_requests())

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    if drafter != "model-confidence":  # the tiny draft LM is rarely confident: its drafts end early
        assert engine.drafter.num_look_aheads > 0


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_fully_accepted_drafts_reuse_the_look_ahead(tiny, reference, arch):
    """The target drafting for itself: every draft kept and the bonus guessed right, so after the
    first step every proposal is the look-ahead's, yet each step still emits K + 1 tokens."""
    models = tiny(arch)
    engine = looking_ahead(make_engine(models.target, make_drafter("echo", models.target, None, 4), 4))

    seqs = engine.generate(greedy_requests())

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    drafter: DraftModelDrafter = engine.drafter
    num_steps = sum(seq.stats.num_steps for seq in seqs)
    assert drafter.num_look_ahead_hits >= num_steps - 2 * len(seqs)  # all but a sequence's first and last
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) >= 0.9 * sum(seq.stats.num_draft_tokens for seq in seqs)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_proposals_with_and_without_look_ahead_are_the_same(tiny, arch):
    """A reused look-ahead is the draft a fresh proposal would have made (greedy drafting depends
    only on the committed tokens), so the per-step drafts and acceptance do not change. With one
    draft token the tiny draft LM's look-aheads both hit and miss."""
    models = tiny(arch)

    def run(look_ahead: bool):
        engine = make_engine(models.target, make_drafter("model-off", models.target, models.draft, 1), 1)
        engine = looking_ahead(engine) if look_ahead else engine
        seqs = engine.generate(greedy_requests())
        return [(seq.output_token_ids, seq.stats) for seq in seqs], engine.drafter

    (plain, _), (ahead, drafter) = run(False), run(True)
    assert ahead == plain
    assert 0 < drafter.num_look_ahead_hits < drafter.num_look_aheads


def test_a_stopped_look_ahead_drafts_nothing(tiny, reference):
    models = tiny("llama")
    engine = looking_ahead(make_engine(models.target, make_drafter("echo", models.target, None, 4), 4),
                           should_stop=lambda: True)

    seqs = engine.generate(greedy_requests())

    assert_matches_target_alone(tiny, reference, "llama", seqs, PROMPTS, MAX_TOKENS)
    assert engine.drafter.num_look_aheads == 0 and engine.drafter.num_look_ahead_hits == 0


def test_sampled_sequences_never_look_ahead(tiny):
    """A batch with a sampled sequence drafts afresh: look-ahead drafts are greedy only."""
    models = tiny("llama")
    engine = looking_ahead(make_engine(models.target, make_drafter("echo", models.target, None, 4), 4))
    sampled = GenerationRequest([5, 6, 7], SamplingParams(temperature=0.8, seed=1), max_tokens=60)

    engine.generate([sampled])

    assert engine.drafter.num_look_aheads == 0

    engine.generate([sampled, *greedy_requests()])  # outlives every greedy one in the batch

    assert engine.drafter.num_look_aheads == engine.drafter.num_look_ahead_hits == 0
