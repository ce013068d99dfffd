"""The DSpark drafter on the distributed draft worker, with the bundled reference pair: greedy output
identical to target-only decoding at TP 1 and TP 2 (gloo), the target's hidden states reaching the
worker (whole, from rank 0), only the target's embeddings and lm_head in the draft worker's process,
sampled drafts on the wire grid, and the confidence schedule running on the worker (TP 1)."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from dspark_ray.config import DEFAULT_DSPARK_DIR, DEFAULT_TARGET_DIR, REFERENCE_DIR, EngineConfig
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.factory import build_engine, feature_layer_ids, load_models
from dspark_ray.engine.loading import load_causal_lm, load_tokenizer
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.engine.verifier import TargetVerifier
from dspark_ray.serving.distributed import codec
from dspark_ray.serving.distributed.draft_worker import build_worker_drafter
from dspark_ray.serving.distributed.tensor_parallel import parameter_bytes

MAX_TOKENS = 24
HELDOUT_LINES = (0, 1, 2, 4)  # 34, 48, 29 and 20 prompt tokens: one ragged batch
WIRE_MAX_SUPPORT = 64  # WorkerPlacement.draft_probs_max_support's default

pytestmark = [pytest.mark.skipif(not (DEFAULT_DSPARK_DIR / "config.json").is_file()
                                or not (DEFAULT_TARGET_DIR / "config.json").is_file(),
                                reason="bundled reference models not present"), pytest.mark.engine]


def dspark_config(tp: int) -> EngineConfig:
    # TP 1 runs the confidence schedule on the worker (the bundled target's SPS profile and the
    # drafter's calibration.json); TP 2 verifies every draft.
    schedule = "confidence" if tp == 1 else "fixed"
    # Always drafting (no governor): the tests compare acceptance with the in-process engine.
    return EngineConfig(target=DEFAULT_TARGET_DIR, draft=DEFAULT_DSPARK_DIR, drafter="dspark",
                        num_speculative_tokens=8, max_batch_size=8, verification_schedule=schedule,
                        load_aware_drafting=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = load_tokenizer(DEFAULT_TARGET_DIR)
    lines = (REFERENCE_DIR / "prompts" / "heldout.jsonl").read_text().splitlines()
    return [tokenizer.encode(json.loads(lines[i])["prompt"]) for i in HELDOUT_LINES]


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def tp(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def distributed(engines_for, tp: int):
    config = dspark_config(tp)
    engine, _ = engines_for(config, tp=tp, tp_sharding="auto")
    return engine, config


@pytest.fixture(scope="module")
def reference_target():
    return load_causal_lm(DEFAULT_TARGET_DIR)


def greedy(prompts: list[list[int]]) -> list[GenerationRequest]:
    return [GenerationRequest(prompt, max_tokens=MAX_TOKENS) for prompt in prompts]


def record_proposals(engine, monkeypatch) -> list:
    """(draft budgets, proposal) of every proposal the coordinator receives from the draft worker."""
    proposals = []
    propose = engine.drafter.propose

    def recording(seqs, max_draft_tokens, time_budget_s=None):
        proposals.append((torch.tensor(max_draft_tokens), propose(seqs, max_draft_tokens, time_budget_s)))
        return proposals[-1][1]

    monkeypatch.setattr(engine.drafter, "propose", recording)
    return proposals


def test_greedy_output_is_target_only_with_drafts_accepted(distributed, prompts, local_outputs, monkeypatch) -> None:
    engine, config = distributed
    engine.pipelining = "on"
    proposals = record_proposals(engine, monkeypatch)

    seqs = engine.generate(greedy(prompts))

    target_only = local_outputs(config.model_copy(update={"drafter": "none"}), greedy(prompts))
    assert [seq.output_token_ids for seq in seqs] == target_only
    # DSpark drafts only for sequences whose target features all arrived, and accepts as many
    # drafts as in-process when the features are right.
    in_process = build_engine(config, load_models(config)).generate(greedy(prompts))
    accepted, local_accepted = (sum(s.stats.num_accepted_tokens for s in run) for run in (seqs, in_process))
    assert accepted > 0 and abs(accepted - local_accepted) <= 0.2 * local_accepted
    budgets = torch.cat([budget for budget, _ in proposals]).clamp(max=config.num_speculative_tokens)
    drafted = torch.cat([proposal.num_draft_tokens for _, proposal in proposals])
    if config.verification_schedule == "fixed":
        assert torch.equal(drafted, budgets)  # every sequence ready to draft at every step
    else:  # the worker's prefix scheduler cut drafts
        assert bool((drafted <= budgets).all()) and bool((drafted < budgets).any())


def test_rank0_returns_the_whole_hidden_states(distributed, prompts, reference_target) -> None:
    """With TP > 1 each rank holds a shard; the features rank 0 sends are the full residual stream."""
    engine, config = distributed
    layer_ids = feature_layer_ids(config)
    local = TargetVerifier(CausalLMRunner(reference_target, 0, layer_ids))
    seqs = [Sequence.create(10_000 + row, request) for row, request in enumerate(greedy(prompts))]

    remote_output = engine.verifier.add(seqs)
    engine.verifier.remove([seq.seq_id for seq in seqs])
    local_output = local.add(seqs)

    for seq, prompt in zip(seqs, prompts):
        remote, expected = remote_output.target_features[seq.seq_id], local_output.target_features[seq.seq_id]
        assert remote.shape == expected.shape == (len(prompt), len(layer_ids) * reference_target.config.hidden_size)
        torch.testing.assert_close(remote, expected, rtol=1e-4, atol=1e-4)


def test_draft_worker_holds_only_the_targets_embeddings_and_lm_head(distributed, reference_target, tp: int) -> None:
    engine, _ = distributed
    if tp > 1:
        pytest.skip("the draft worker is the same at any TP")
    held = ray.get(engine.draft.actors[0].target_parameter_bytes.remote())
    borrowed = (reference_target.get_input_embeddings().weight, reference_target.get_output_embeddings().weight)
    assert held == sum(weight.numel() * weight.element_size() for weight in borrowed)
    assert held < parameter_bytes(reference_target).total / 4


def test_sampled_drafts_are_on_the_wire_grid(distributed, prompts, monkeypatch, tp: int) -> None:
    engine, _ = distributed
    if tp > 1:
        pytest.skip("the draft worker is the same at any TP")
    proposals = record_proposals(engine, monkeypatch)
    requests = [GenerationRequest(prompt, SamplingParams(temperature=0.8, seed=3 + i), max_tokens=16)
                for i, prompt in enumerate(prompts)]

    seqs = engine.generate(requests)

    assert all(seq.is_finished and seq.output_token_ids for seq in seqs)
    distributions = [d for _, proposal in proposals for row in proposal.wire_probs for d in row]
    assert distributions, "no sampled drafts"
    for distribution in distributions:
        assert distribution.counts and not distribution.probs  # on the 1/65536 grid: sent as counts
        assert len(distribution.token_ids) // 4 <= WIRE_MAX_SUPPORT  # int32 ids
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) > 0
    assert [seq.output_token_ids for seq in engine.generate(requests)] == [seq.output_token_ids for seq in seqs]


def test_worker_drafter_samples_from_the_distributions_it_reports(prompts, reference_target) -> None:
    """The worker's own drafter (hollow target, no Ray): with the grid at most 2 tokens wide, every
    sampled draft lies in the support of the distribution reported for it, which is on the grid."""
    config = dspark_config(tp=2)  # fixed schedule: every draft is reported
    drafter = build_worker_drafter(config, max_support=2)
    verifier = TargetVerifier(CausalLMRunner(reference_target, 0, feature_layer_ids(config)))
    seqs = [Sequence.create(row, GenerationRequest(prompt, SamplingParams(temperature=1.0, seed=row)))
            for row, prompt in enumerate(prompts)]
    output = verifier.add(seqs)
    for row, seq in enumerate(seqs):
        seq.output_token_ids.extend(output.result.tokens(row))
    drafter.add(seqs, output.target_features)

    proposal = drafter.propose(seqs, [8] * len(seqs))

    assert proposal.num_draft_tokens.tolist() == [8] * len(seqs)
    assert torch.equal(proposal.draft_probs, codec.quantize(proposal.draft_probs, 2))
    assert bool((proposal.draft_probs.gather(-1, proposal.draft_token_ids[..., None]) > 0).all())


def test_features_of_steps_without_drafts_reach_the_worker(distributed, prompts, local_outputs, tp: int) -> None:
    """Drafting switched off every other step: the target features of those steps travel with the
    next proposal (concatenated, never overwritten), so DSpark keeps drafting, as well as in-process."""
    from harness import Alternating

    if tp > 1:
        pytest.skip("the feedback path is the same at any TP")
    engine, config = distributed
    engine.pipelining, engine.governor = "off", Alternating()
    try:
        seqs = engine.generate(greedy(prompts))
    finally:
        engine.pipelining, engine.governor = "auto", None
    local = build_engine(config, load_models(config))
    local.governor = Alternating()
    in_process = local.generate(greedy(prompts))

    assert [seq.output_token_ids for seq in seqs] == local_outputs(config.model_copy(update={"drafter": "none"}),
                                                                  greedy(prompts))
    accepted, local_accepted = (sum(s.stats.num_accepted_tokens for s in run) for run in (seqs, in_process))
    assert accepted > 0 and abs(accepted - local_accepted) <= 0.2 * local_accepted


def test_bfloat16_workers_draft_and_match_the_in_process_engine(engines_for, prompts) -> None:
    """bf16 (the GPU dtype) on CPU workers: the draft worker's DSpark drafter and the target worker
    run in bf16 and, stepping unpipelined (the in-process engine's batches, so the same bf16
    forwards), give the in-process bf16 engine's tokens, with drafts accepted. deploy/gpu_check.sh
    runs this path on the GPU."""
    config = dspark_config(1).model_copy(update={"dtype": "bfloat16", "verification_schedule": "fixed"})
    engine, _ = engines_for(config, tp=1)
    engine.pipelining = "off"

    seqs = engine.generate(greedy(prompts))

    in_process = build_engine(config, load_models(config)).generate(greedy(prompts))
    assert [seq.output_token_ids for seq in seqs] == [seq.output_token_ids for seq in in_process]
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) > sum(seq.stats.num_steps for seq in seqs)
