"""The drafter's context cache: each proposal runs only the tokens cached since the sequence's last
one through the K/V projections and one block per sequence, of the positions it drafts; while
drafting is off nothing is projected; after any number of accepts, rollbacks and undrafted steps
the context equals a recomputation from scratch."""

from __future__ import annotations

import pytest
import torch

from dspark_ray.deepspec.target_pass import TargetPass
from dspark_ray.dspark.context_cache import ContextCache
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.dspark.pending_features import PendingFeatures
from dspark_ray.engine.sequence import GenerationRequest
from test_dspark_greedy_identity import MAX_TOKENS, make_engine
from tiny_dspark import PROMPTS


def test_only_new_tokens_are_processed(tiny_targets, tiny_dspark, monkeypatch):
    arch = "deepseek_v3"
    model = tiny_dspark(arch, "gated", block_size=6).model
    block_inputs: list[tuple[int, int]] = []  # (block positions per row, rows) of each backbone forward
    forward = DSparkModel.forward

    def spy(self, anchor_ids, *args, **kwargs):
        output = forward(self, anchor_ids, *args, **kwargs)
        block_inputs.append((output.hidden.shape[2], output.hidden.shape[0]))
        return output

    monkeypatch.setattr(DSparkModel, "forward", spy)
    engine = make_engine(tiny_targets(arch).target, model, 6)
    widths: list[int] = []  # the most drafts of a row, per proposal that drafted
    propose = engine.drafter.propose

    drafted_context: dict[int, int] = {}  # seq_id -> its context tokens at its latest drafting proposal

    def drafts(seqs, budgets, time_budget_s=None):
        drafted_context.update({seq.seq_id: seq.num_tokens - 1 for seq, budget in zip(seqs, budgets) if budget})
        proposal = propose(seqs, budgets, time_budget_s)
        widths.extend([proposal.draft_token_ids.shape[1]] if proposal.num_draft_tokens.any() else [])
        return proposal

    engine.drafter.propose = drafts

    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    drafting_steps = 0  # a step drafts unless every running sequence has one token left (the bonus)
    while engine.has_unfinished():
        drafting_steps += any(seq.remaining_tokens > 1 for seq in engine.running)
        engine.step()

    processed = engine.drafter.num_context_tokens_processed
    # The first proposal projects the prompts; each later one the tokens committed since (the last
    # committed token + accepted drafts), each context token once: what a sequence committed after
    # its last proposal is never projected.
    assert processed[0] == sum(len(p) for p in PROMPTS)
    assert sum(processed) == sum(drafted_context.values())
    assert sum(drafted_context.values()) > sum(len(p) for p in PROMPTS) + 2 * len(PROMPTS)
    steps = max(seq.stats.num_steps for seq in seqs)
    assert len(processed) == drafting_steps
    assert max(processed[1:]) <= len(PROMPTS) * (1 + 6)
    # One block per sequence per step, of the positions drafted: the whole block until sequences near
    # their max_tokens draft fewer.
    assert [positions for positions, _ in block_inputs] == widths
    assert widths.count(6) >= len(widths) // 2 and max(widths) == 6
    assert len(block_inputs) == drafting_steps >= steps - 1


def test_cache_matches_a_recomputation_after_rollbacks(tiny_targets, tiny_dspark):
    arch = "llama"
    target, model = tiny_targets(arch).target, tiny_dspark(arch, "vanilla", block_size=4).model
    engine = make_engine(target, model, 4)
    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=40)) for p in PROMPTS]
    for _ in range(6):
        engine.step()
    assert sum(seq.stats.num_draft_tokens - seq.stats.num_accepted_tokens for seq in seqs) > 0  # rollbacks ran
    assert_context_is_a_recomputation(engine, target, model, seqs)


class Switch:
    """A drafting policy that drafts only while `on`."""

    def __init__(self) -> None:
        self.on = False

    def draft_limit(self, batch_size: int) -> int | None:
        return None if self.on else 0

    def record(self, *args) -> None:
        pass


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_undrafted_steps_project_nothing_and_drafting_resumes_on_a_whole_context(tiny_targets, tiny_dspark, arch):
    target, model = tiny_targets(arch).target, tiny_dspark(arch, "vanilla", block_size=4).model
    engine = make_engine(target, model, 4)
    engine.governor = switch = Switch()
    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=40)) for p in PROMPTS]
    for _ in range(5):
        engine.step()
    assert engine.drafter.num_context_tokens_processed == []
    switch.on = True
    for _ in range(3):
        engine.step()
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) > 0
    switch.on = False
    engine.step()  # features wait again, behind projected ones
    assert_context_is_a_recomputation(engine, target, model, seqs)


def assert_context_is_a_recomputation(engine, target, model, seqs) -> None:
    target_pass = TargetPass(target, list(model.config.target_layer_ids))
    for seq in seqs:
        context = seq.token_ids[:-1]  # the last committed token is the next anchor, not yet in the target
        entries, valid = engine.drafter.context([seq])
        assert valid.sum() == len(context)
        features = target_pass(torch.tensor([context]), torch.tensor([len(context)])).features[0]
        expected = model.context_kv(features, torch.arange(len(context)))
        torch.testing.assert_close(entries[0, : len(context)], expected, atol=1e-4, rtol=1e-4)


def test_pending_features_verbs():
    pending = PendingFeatures()
    pending.append(1, torch.arange(3.0)[:, None])
    pending.append(1, torch.tensor([[3.0], [4.0]]))
    pending.append(1, torch.zeros(0, 1))
    assert pending.length(1) == 5 and pending.length(2) == 0 and pending.take(2) is None
    pending.truncate(1, 4)
    assert pending.take(1)[:, 0].tolist() == [0, 1, 2, 3] and pending.length(1) == 0
    pending.append(2, torch.ones(2, 1))
    pending.truncate(2, 0)
    assert pending.take(2) is None
    pending.append(3, torch.ones(2, 1))
    pending.remove(3)
    assert pending.length(3) == 0


def test_context_cache_verbs():
    cache = ContextCache()
    cache.add(1)
    cache.add(2)
    cache.append(1, torch.arange(3.0)[:, None])
    cache.append(1, torch.tensor([[3.0], [4.0]]))
    cache.append(2, torch.tensor([[9.0]]))
    cache.truncate(1, 4)
    entries, valid = cache.batch([2, 1])
    assert entries[:, :, 0].tolist() == [[9, 0, 0, 0], [0, 1, 2, 3]]
    assert valid.tolist() == [[True, False, False, False], [True] * 4]
    cache.append(1, torch.tensor([[7.0]] * 100))  # grows past the initial capacity
    assert cache.length(1) == 104 and cache.batch([1])[0][0, 4:, 0].tolist() == [7.0] * 100
    cache.remove(1)
    assert 1 not in cache
