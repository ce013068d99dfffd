"""A time budget on the draft LM's proposals (pipelined steps draft no longer than the target
verifies): greedy rows stop early, each keeping its first draft; sampled rows and the output never
change."""

from __future__ import annotations

import pytest

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.sequence import GenerationRequest
from harness import make_drafter, make_engine
from test_greedy_identity import MAX_TOKENS, PROMPTS, assert_matches_target_alone

K = 4


def echo_engine(tiny, arch: str):
    """The target drafting for itself with a fixed length: without a budget every row drafts K."""
    models = tiny(arch)
    return make_engine(models.target, make_drafter("echo", models.target, None, K), K)


def with_budget(engine, time_budget_s: float):
    """`engine` proposing with `time_budget_s` at every step; records each proposal's draft counts."""
    propose, counts = engine.propose, []

    def propose_within(seqs, draft_limit=None, time_budget=None):
        proposal = propose(seqs, draft_limit, time_budget_s)
        counts.append(proposal.num_draft_tokens.tolist())
        return proposal

    engine.propose = propose_within
    return engine, counts


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_a_spent_budget_leaves_each_greedy_row_its_first_draft_and_the_output_unchanged(tiny, reference, arch):
    engine, counts = with_budget(echo_engine(tiny, arch), time_budget_s=0.0)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    # K without the budget (next test); 0 where a sequence has one token left
    assert {count for step in counts for count in step} == {0, 1}


def test_an_ample_budget_drafts_as_far_as_without_one(tiny):
    engine, counts = with_budget(echo_engine(tiny, "llama"), time_budget_s=60.0)

    engine.generate([GenerationRequest(list(PROMPTS[0]), max_tokens=2 * (K + 1) + 1)])

    assert counts[:2] == [[K], [K]]


def test_sampled_rows_draft_in_full_beside_greedy_rows_cut_short(tiny):
    engine = echo_engine(tiny, "llama")
    greedy = engine.add_request(GenerationRequest(list(PROMPTS[0]), max_tokens=32))
    sampled = engine.add_request(GenerationRequest(list(PROMPTS[1]), SamplingParams(temperature=0.8, seed=3),
                                                   max_tokens=32))
    engine.admit()

    proposal = engine.propose([greedy, sampled], time_budget_s=0.0)

    assert proposal.num_draft_tokens.tolist() == [1, K]
