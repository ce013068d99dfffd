"""The drafter runs only the block positions a step drafts: a greedy batch limited to 2 drafts runs
a 2-position block, not the whole one; a batch with a sampled row runs the whole block, so that
row's drafts do not depend on its neighbours' limits; and greedy output stays the target's."""

from __future__ import annotations

import torch

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.engine.sequence import GenerationRequest
from test_dspark_greedy_identity import assert_identical, make_engine
from tiny_dspark import PROMPTS

SAMPLED = SamplingParams(temperature=1.0, seed=7)


def _spy_positions(monkeypatch) -> list[int]:
    positions: list[int] = []
    forward = DSparkModel.forward

    def spy(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        positions.append(output.hidden.shape[2])
        return output

    monkeypatch.setattr(DSparkModel, "forward", spy)
    return positions


def _started(engine, requests):
    seqs = [engine.add_request(request) for request in requests]
    engine.step()  # the prefill: every drafter context is complete afterwards
    return seqs


def test_a_limited_greedy_batch_runs_only_the_drafted_positions(tiny_targets, tiny_dspark, reference, monkeypatch):
    arch = "llama"
    engine = make_engine(tiny_targets(arch).target, tiny_dspark(arch, "gated", block_size=6).model, 6)
    positions = _spy_positions(monkeypatch)
    seqs = _started(engine, [GenerationRequest(list(p), max_tokens=30) for p in PROMPTS])

    full = engine.propose(seqs)
    short = engine.propose(seqs, draft_limit=2)

    assert positions == [6, 2]
    assert full.draft_token_ids.shape[1] == 6 and short.draft_token_ids.shape[1] == 2
    # A cut block is a different proposal, and greedy output is still the target's.
    while engine.has_unfinished():
        engine.step()
    assert_identical(reference, arch, seqs, max_tokens=[30] * len(PROMPTS))


def test_a_sampled_row_gets_whole_block_drafts_whatever_its_neighbours_draft(tiny_targets, tiny_dspark,
                                                                             monkeypatch):
    arch = "llama"
    target, model = tiny_targets(arch).target, tiny_dspark(arch, "gated", block_size=6).model
    positions = _spy_positions(monkeypatch)
    drafts = []
    for neighbours in ([], [GenerationRequest(list(PROMPTS[1]), max_tokens=30)]):
        engine = make_engine(target, model, 6)
        # Near its max_tokens the sampled row drafts 2; alone, a block cut to its length would make
        # its drafts differ from those it gets beside a greedy row drafting 6.
        sampled = GenerationRequest(list(PROMPTS[0]), max_tokens=4, sampling=SAMPLED)
        seqs = _started(engine, [sampled] + neighbours)
        positions.clear()
        proposal = engine.propose(seqs)
        assert positions == [6] and int(proposal.num_draft_tokens[0]) == 2
        drafts.append(proposal.draft_token_ids[0, :2])
    torch.testing.assert_close(drafts[0], drafts[1])
