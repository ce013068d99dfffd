"""The drafter's context cache: each step runs only the newly cached tokens through the K/V
projections, each proposal runs one block of block_size positions per sequence, and after any
number of accepts and rollbacks the cache equals a recomputation from scratch."""

from __future__ import annotations

import torch

from dspark_ray.deepspec.target_pass import TargetPass
from dspark_ray.dspark.context_cache import ContextCache
from dspark_ray.dspark.model import DSparkModel
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

    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    drafting_steps = 0  # a step drafts unless every running sequence has one token left (the bonus)
    while engine.has_unfinished():
        drafting_steps += any(seq.remaining_tokens > 1 for seq in engine.running)
        engine.step()

    processed = engine.drafter.num_context_tokens_processed
    # The prefill brings the prompts; every step then brings the last committed token + accepted drafts.
    assert processed[0] == sum(len(p) for p in PROMPTS)
    assert sum(processed) == sum(len(p) + len(seq.output_token_ids) - 1 for p, seq in zip(PROMPTS, seqs))
    steps = max(seq.stats.num_steps for seq in seqs)
    assert len(processed) == 1 + steps
    assert max(processed[1:]) <= len(PROMPTS) * (1 + 6)
    assert all(positions == 6 for positions, _ in block_inputs)  # one block per sequence per step
    assert len(block_inputs) == drafting_steps >= steps - 1


def test_cache_matches_a_recomputation_after_rollbacks(tiny_targets, tiny_dspark):
    arch = "llama"
    target, model = tiny_targets(arch).target, tiny_dspark(arch, "vanilla", block_size=4).model
    engine = make_engine(target, model, 4)
    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=40)) for p in PROMPTS]
    target_pass = TargetPass(target, list(model.config.target_layer_ids))
    for _ in range(6):
        engine.step()
    assert sum(seq.stats.num_draft_tokens - seq.stats.num_accepted_tokens for seq in seqs) > 0  # rollbacks ran

    for seq in seqs:
        context = seq.token_ids[:-1]  # the last committed token is the next anchor, not yet in the target
        entries, valid = engine.drafter.cache.batch([seq.seq_id])
        assert valid.sum() == len(context)
        features = target_pass(torch.tensor([context]), torch.tensor([len(context)])).features[0]
        expected = model.context_kv(features, torch.arange(len(context)))
        torch.testing.assert_close(entries[0, : len(context)], expected, atol=1e-4, rtol=1e-4)


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
