"""The distributed engine (Ray actors, gRPC, tensor parallelism over gloo) says exactly what the
in-process engine says: greedy token for token, for model and n-gram drafters, TP=1 and TP=2."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import PROMPTS, engine_config, greedy_requests, outputs
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.sequence import GenerationRequest


@dataclass(frozen=True)
class Case:
    arch: str
    tp: int
    drafter: str
    tp_sharding: str = "auto"

    def __str__(self) -> str:
        return f"{self.arch}-tp{self.tp}-{self.drafter}-{self.tp_sharding}"


CASES = [
    pytest.param(Case("llama", 1, "model"), id="llama-tp1-model"),
    pytest.param(Case("llama", 1, "ngram"), id="llama-tp1-ngram"),
    # MoE targets over two gloo ranks: transformers' plan (Qwen3-MoE), our own sharding (DeepSeek-V3).
    pytest.param(Case("qwen3_moe", 2, "model"), id="qwen3_moe-tp2-model", marks=pytest.mark.slow),
    pytest.param(Case("deepseek_v3", 2, "ngram", "manual"), id="deepseek_v3-tp2-ngram-manual", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def distributed(distributed_engines, case: Case):
    engine, _, config = distributed_engines(case.arch, case.drafter, tp=case.tp, tp_sharding=case.tp_sharding)
    return engine, config


def test_greedy_output_is_the_in_process_engines(distributed, local_outputs) -> None:
    engine, config = distributed
    engine.pipelining = "on"  # the overlapping strategy; "off" below, "auto" (the default) elsewhere
    seqs = engine.generate(greedy_requests())
    assert outputs(seqs) == local_outputs(config, greedy_requests())
    assert all(len(seq.output_token_ids) == 20 for seq in seqs)


def test_pipelining_and_sync_mode_do_not_change_the_output(distributed, local_outputs, case: Case) -> None:
    engine, config = distributed
    if case.tp > 1:
        pytest.skip("covered at TP=1")
    try:
        engine.pipelining = "off"
        engine.verifier.inline_sync = engine.drafter.inline_sync = False  # a Sync command after each step
        assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
        assert engine.wire_stats().num_calls.get("target.Sync", 0) > 0
    finally:
        engine.pipelining = "auto"
        engine.verifier.inline_sync = engine.drafter.inline_sync = True


def test_drafting_time_boxed_on_the_draft_worker_keeps_the_output(distributed, local_outputs, case: Case,
                                                                  monkeypatch) -> None:
    """A pipelined step's time budget crosses the wire: spent at once (the target taking no time),
    each greedy row drafts one token, where the full length drafts more."""
    engine, config = distributed
    if case.tp > 1 or case.drafter != "model":
        pytest.skip("the draft LM's time budget, covered at TP=1")
    drafts_per_row: dict[bool, list[int]] = {False: [], True: []}  # by whether a time budget came along
    propose = engine.drafter.propose

    def recording(seqs, max_draft_tokens, time_budget_s=None):
        proposal = propose(seqs, max_draft_tokens, time_budget_s)
        drafts_per_row[time_budget_s is not None].extend(proposal.num_draft_tokens.tolist())
        return proposal

    monkeypatch.setattr(engine.drafter, "propose", recording)
    monkeypatch.setattr(engine, "pipelining", "on")
    monkeypatch.setattr(engine, "time_boxed_drafting", False)
    assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
    assert max(drafts_per_row[False]) > 1 and not drafts_per_row[True]
    monkeypatch.setattr(engine, "time_boxed_drafting", True)
    monkeypatch.setattr(engine, "_observe_target", lambda seconds: None)
    monkeypatch.setattr(engine, "target_seconds", 0.0)
    assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
    assert max(drafts_per_row[True]) == 1  # cold starts (nothing to overlap) still draft in full


def test_seeded_sampling_is_reproducible(distributed) -> None:
    engine, _ = distributed
    requests = [GenerationRequest(prompt, SamplingParams(temperature=0.9, top_k=40, seed=7 + i), max_tokens=12)
                for i, prompt in enumerate(PROMPTS)]
    first, second = outputs(engine.generate(requests)), outputs(engine.generate(requests))
    assert first == second
    unseeded = [GenerationRequest(prompt, SamplingParams(temperature=0.9), max_tokens=12) for prompt in PROMPTS]
    assert outputs(engine.generate(unseeded)) != first  # fresh entropy without a seed


def test_sequences_are_released_on_every_worker(distributed) -> None:
    engine, _ = distributed
    engine.generate(greedy_requests(max_tokens=4))
    from dspark_ray.serving.wire import worker_pb2 as pb

    for handle in (engine.target, engine.draft):
        stub, _ = handle.current()
        assert stub.Health(pb.HealthRequest(), timeout=10).num_sequences == 0


def test_tensor_parallel_ranks_hold_shards(distributed, tiny, case: Case) -> None:
    engine, _ = distributed
    if case.tp == 1:
        pytest.skip("one rank")
    from dspark_ray.serving.distributed.tensor_parallel import parameter_bytes

    full = parameter_bytes(tiny(case.arch).target)
    per_rank = engine.target.parameter_bytes()
    assert len(per_rank) == case.tp
    for rank in per_rank:
        assert rank["total"] < full.total
        assert 0 < rank["experts"] <= full.experts // case.tp  # routed experts really split


def test_bytes_on_the_wire_per_generated_token(distributed, case: Case, record_property) -> None:
    engine, _ = distributed
    engine.wire_stats(reset=True)
    engine.generate(greedy_requests())
    greedy = engine.wire_stats(reset=True)
    engine.generate([GenerationRequest(p, SamplingParams(temperature=0.9, seed=1), max_tokens=20) for p in PROMPTS])
    sampled = engine.wire_stats(reset=True)
    record_property("greedy_bytes_per_token", round(greedy.bytes_per_generated_token, 1))
    record_property("sampled_bytes_per_token", round(sampled.bytes_per_generated_token, 1))
    print(f"\n{case}: bytes on the wire per generated token: greedy {greedy.bytes_per_generated_token:.1f}, "
          f"sampled {sampled.bytes_per_generated_token:.1f}")
    assert greedy.num_generated_tokens == len(PROMPTS) * 20
    assert greedy.bytes_per_generated_token < 200  # ids only, no histories resent
    assert sampled.bytes_per_generated_token < 64 * 6 * 4  # sparse distributions, never [V] floats


@pytest.mark.parametrize("pipelining", ["off", "on"])
def test_look_ahead_keeps_the_output_and_is_reused(engines_for, tiny, local_outputs, pipelining) -> None:
    """The draft worker drafts past each proposal while the target verifies it. With the target
    as its own draft LM every draft is kept and the bonus guessed right, so proposals reuse the
    look-ahead; the output stays the in-process engine's."""
    import ray

    models = tiny("llama")
    config = engine_config(models, "model", adaptive_speculation="off").model_copy(update={"draft": models.target_dir})
    engine, _ = engines_for(config, look_ahead=True)
    engine.pipelining = pipelining
    try:
        before = ray.get(engine.draft.actors[0].look_ahead_counts.remote())
        assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
        num_look_aheads, num_hits = (after - earlier for after, earlier in
                                     zip(ray.get(engine.draft.actors[0].look_ahead_counts.remote()), before))
        assert num_look_aheads > 0 and num_hits > 0
    finally:
        engine.pipelining = "auto"


def test_governor_is_wired(engines_for, tiny, local_outputs) -> None:
    """With load-aware drafting (the default) the distributed engine has a governor, which measures
    both modes on the tiny pair; the output stays the in-process engine's."""
    from dspark_ray.engine.governor import SpeculationGovernor

    config = engine_config(tiny("llama"), "model", load_aware_drafting=True)
    engine, _ = engines_for(config)
    assert isinstance(engine.governor, SpeculationGovernor)
    engine.pipelining = "off"
    try:
        for _ in range(3):
            assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
        assert any(len(rates) == 2 for rates in engine.governor.rates().values())
    finally:
        engine.pipelining = "auto"
