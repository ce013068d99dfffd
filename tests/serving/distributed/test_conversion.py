"""Engine types <-> worker messages, and the workers' sequence copies."""

from __future__ import annotations

import pytest
import torch

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.drafters.base import DraftProposal
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.serving.distributed import codec, convert
from dspark_ray.serving.distributed.mirror import SequenceMirror, SequenceStateError
from dspark_ray.serving.distributed.remote import _KnownTokens

VOCAB = 50


def _seq(seq_id: int, prompt: list[int], output: list[int], temperature: float = 0.0) -> Sequence:
    seq = Sequence.create(seq_id, GenerationRequest(prompt, SamplingParams(temperature=temperature, top_k=5)))
    seq.output_token_ids.extend(output)
    return seq


def test_sequence_specs_and_updates_reach_the_mirror() -> None:
    seq = _seq(3, [1, 2, 3], [4], temperature=0.7)
    mirror = SequenceMirror()
    [copy] = mirror.add([convert.spec_to_wire(seq, seed=11, with_output=True)])
    assert copy.token_ids == seq.token_ids and copy.request.sampling == SamplingParams(0.7, 5, 1.0, 0.0)
    seq.output_token_ids.extend([5, 6])
    mirror.apply([convert.token_update(seq, num_known_tokens=4)])
    assert copy.token_ids == [1, 2, 3, 4, 5, 6]
    mirror.apply([convert.token_update(seq, num_known_tokens=6)])  # nothing new: no change
    assert copy.token_ids == seq.token_ids


def test_an_undone_step_rolls_the_mirror_back() -> None:
    """A failed step undone on the coordinator (`SpeculativeEngine.step`) leaves a sequence with
    fewer tokens than its worker holds; the next update says so and the copy follows."""
    seq = _seq(2, [1, 2, 3], [4, 5, 6])
    mirror = SequenceMirror()
    [copy] = mirror.add([convert.spec_to_wire(seq, seed=0, with_output=True)])
    known = _KnownTokens()
    known.mark([seq])
    del seq.output_token_ids[1:]  # undone: the retry's first command carries the roll-back
    mirror.apply(known.updates([seq]))
    known.mark([seq])
    assert copy.token_ids == [1, 2, 3, 4]
    seq.output_token_ids.append(9)  # the retry's commit
    mirror.apply(known.updates([seq]))
    assert copy.token_ids == seq.token_ids == [1, 2, 3, 4, 9]


def test_mirror_refuses_what_it_cannot_know() -> None:
    mirror = SequenceMirror()
    seq = _seq(1, [1, 2], [])
    mirror.add([convert.spec_to_wire(seq, 0)])
    with pytest.raises(SequenceStateError):
        mirror.add([convert.spec_to_wire(seq, 0)])
    with pytest.raises(SequenceStateError):
        mirror.get([99])
    seq.output_token_ids.extend([7, 8, 9])
    with pytest.raises(SequenceStateError):  # claims the worker knows 4 tokens; it holds 2
        mirror.apply([convert.token_update(seq, num_known_tokens=4)])
    assert mirror.remove([1, 99]) == [1]


def test_per_command_seeds_make_worker_draws_reproducible() -> None:
    mirror = SequenceMirror()
    greedy, sampled = _seq(1, [1], []), _seq(2, [1], [], temperature=1.0)
    copies = mirror.add([convert.spec_to_wire(greedy, 0), convert.spec_to_wire(sampled, 0)])
    mirror.reseed(copies, [5, 5])
    first = torch.rand(3, generator=copies[1].generator)
    mirror.reseed(copies, [5, 5])
    assert torch.equal(torch.rand(3, generator=copies[1].generator), first)


def test_proposals_travel_sparse_and_come_back_dense_exactly() -> None:
    seqs = [_seq(1, [1], [], temperature=0.0), _seq(2, [1], [], temperature=1.0), _seq(3, [1], [], 1.0)]
    probs = codec.quantize(torch.softmax(torch.randn(3, 2, VOCAB), -1), 8)
    proposal = DraftProposal.from_lists([[4, 5], [6, 7], []], [[probs[0, 0], probs[0, 1]], [probs[1, 0], probs[1, 1]], []],
                                        VOCAB)
    drafts = convert.proposal_to_wire(proposal, seqs)
    assert [len(d.draft_probs) for d in drafts] == [0, 2, 0]  # greedy rows send no probabilities
    encoded = convert.proposal_from_wire(drafts)
    assert encoded.draft_probs is None and encoded.num_draft_tokens.tolist() == [2, 2, 0]
    items = convert.verify_items_to_wire(seqs[1:], encoded.select([1, 2]), [8, 9])  # rows survive select
    items = [convert.verify_items_to_wire(seqs[:1], encoded.select([0]), [0])[0], *items]
    rebuilt = convert.proposal_from_verify_items(items, VOCAB)
    assert torch.equal(rebuilt.draft_token_ids, proposal.draft_token_ids)
    assert torch.equal(rebuilt.draft_probs[1], probs[1])  # exactly what the drafter sampled from
    assert convert.proposal_from_verify_items(items, None).draft_probs is None  # followers need no probs


def test_results_and_features_round_trip() -> None:
    from dspark_ray.core.verification import VerificationResult
    from dspark_ray.engine.verifier import VerifyOutput

    seqs = [_seq(1, [1], []), _seq(2, [1], [])]
    features = {1: torch.randn(3, 4), 2: torch.randn(1, 4)}
    output = VerifyOutput(VerificationResult.make_dummy([[4, 5, 6], [7]], 3), features)
    back = convert.results_from_wire(convert.results_to_wire(output, seqs), [1, 2], 3)
    assert torch.equal(back.result.output_token_ids, output.result.output_token_ids)
    assert torch.equal(back.result.num_accepted, output.result.num_accepted)
    assert all(torch.equal(back.target_features[i], features[i]) for i in (1, 2))
