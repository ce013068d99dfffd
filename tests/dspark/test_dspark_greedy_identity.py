"""Greedy losslessness with `--drafter dspark`: each sequence's output equals the target alone (HF
`generate`, greedy, that prompt by itself), token for token, 100%, on fp32 CPU, whatever the target
architecture, sequential head, block size, draft budget or batch composition.

Never loosen these checks to "most tokens match": a mismatch is a defect.
"""

from __future__ import annotations

import pytest

from dspark_ray.config import EngineConfig
from dspark_ray.engine.drafters.dspark import DSparkDrafter
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import FinishReason, GenerationRequest
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from tiny_dspark import PROMPTS
from tiny_models import WINDOWED_ARCHITECTURES

MAX_TOKENS = (40, 24, 33, 29, 36)  # sequences leave the batch at different steps
ARCHITECTURES = ("llama", "qwen3_moe", "deepseek_v3")
# Features captured from sliding-window and chunked layers: every windowed target with untrained
# drafters (drafts rejected: rollbacks), gpt-oss also trained (drafts kept and rejected; training the
# others costs tens of seconds each)
TRAINED_ARCHITECTURES = ARCHITECTURES + ("gpt_oss",)


def make_engine(target, model, num_speculative_tokens: int, max_batch_size: int = 32) -> SpeculativeEngine:
    runner = CausalLMRunner(target, 0, list(model.config.target_layer_ids))
    return SpeculativeEngine(TargetVerifier(runner), DSparkDrafter(model, num_speculative_tokens),
                             StopRules(set(), 256), num_speculative_tokens, max_batch_size)


def assert_identical(reference, arch, seqs, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> None:
    for seq, prompt, n in zip(seqs, prompts, max_tokens, strict=True):
        expected = reference(arch, prompt, n)
        assert seq.output_token_ids == expected, (arch, prompt, seq.output_token_ids, expected)


@pytest.mark.parametrize("num_speculative_tokens", [1, 3, 6])
@pytest.mark.parametrize("arch", TRAINED_ARCHITECTURES)
def test_trained_drafter_equals_target_alone(tiny_targets, tiny_dspark, reference, arch, num_speculative_tokens):
    drafter = tiny_dspark(arch, "gated", block_size=6)
    engine = make_engine(tiny_targets(arch).target, drafter.model, num_speculative_tokens)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_identical(reference, arch, seqs)
    assert all(seq.finish_reason == FinishReason.LENGTH for seq in seqs)
    drafted = sum(seq.stats.num_draft_tokens for seq in seqs)
    accepted = sum(seq.stats.num_accepted_tokens for seq in seqs)
    assert 0 < accepted < drafted, (accepted, drafted)  # drafts were kept AND rejected (rollbacks ran)
    assert max(max(seq.stats.num_accepted_per_position or [0]) for seq in seqs) > 0
    for seq in seqs:
        assert len(seq.output_token_ids) == 1 + seq.stats.num_steps + seq.stats.num_accepted_tokens


@pytest.mark.parametrize(("head", "block_size"), [("none", 2), ("vanilla", 4), ("rnn", 5), ("gated", 8)])
@pytest.mark.parametrize("arch", ARCHITECTURES + WINDOWED_ARCHITECTURES)
def test_every_head_and_block_size_equals_target_alone(tiny_targets, tiny_dspark, reference, arch, head, block_size):
    drafter = tiny_dspark(arch, head, block_size=block_size, trained=False)
    engine = make_engine(tiny_targets(arch).target, drafter.model, num_speculative_tokens=block_size)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_identical(reference, arch, seqs)
    assert all(seq.stats.num_draft_tokens > 0 for seq in seqs)


def test_requests_joining_and_leaving_mid_run(tiny_targets, tiny_dspark, reference):
    """max_batch_size 2: later requests wait, join while others run, and leave at different steps."""
    arch = "deepseek_v3"
    engine = make_engine(tiny_targets(arch).target, tiny_dspark(arch, "gated", block_size=6).model, 4,
                         max_batch_size=2)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_identical(reference, arch, seqs)
    assert engine.drafter.cache._lengths == {}  # every finished sequence was released
    assert all(engine.drafter.pending.length(seq.seq_id) == 0 for seq in seqs)  # with its unprojected features


def test_factory_builds_dspark_engine_from_directories(tiny_targets, tiny_dspark, reference):
    """The CLI path: EngineConfig(drafter='dspark', draft=DIR) -> load_models -> build_engine."""
    arch = "llama"
    config = EngineConfig(target=tiny_targets(arch).target_dir, drafter="dspark",
                          draft=tiny_dspark(arch, "vanilla", block_size=4).directory, num_speculative_tokens=4)
    models = load_models(config)
    engine = build_engine(config, models)
    assert isinstance(engine.drafter, DSparkDrafter)
    assert engine.verifier.runner.capture.layer_ids == list(models.dspark.config.target_layer_ids)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_identical(reference, arch, seqs)


def test_a_sequence_that_fails_a_step_fails_alone_and_the_others_keep_drafting(tiny_targets, tiny_dspark, reference,
                                                                              monkeypatch):
    """A fault after the target's forward captured every row's features (the verification rule):
    the step is undone, the drafter's contexts roll back with it, and the others go on drafting."""
    from dspark_ray.engine import verifier as verifier_module

    arch = "llama"
    engine = make_engine(tiny_targets(arch).target, tiny_dspark(arch, "gated", block_size=6).model, 4)
    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    culprit, drafted_at_fault = seqs[2], {}
    verify = verifier_module._verify

    def poisoned(step_seqs, proposal, logits):
        if culprit in step_seqs and len(culprit.output_token_ids) >= 6:
            drafted_at_fault.update({seq.seq_id: seq.stats.num_draft_tokens for seq in seqs})
            raise RuntimeError("poisoned")
        return verify(step_seqs, proposal, logits)

    monkeypatch.setattr(verifier_module, "_verify", poisoned)
    while engine.has_unfinished():
        engine.step()

    survivors = [index for index in range(len(PROMPTS)) if index != 2]
    assert_identical(reference, arch, [seqs[i] for i in survivors], [PROMPTS[i] for i in survivors],
                     [MAX_TOKENS[i] for i in survivors])
    assert culprit.finish_reason == FinishReason.ERROR
    assert all(seqs[i].stats.num_draft_tokens > drafted_at_fault[seqs[i].seq_id] for i in survivors)
    assert engine.drafter.cache._lengths == {} and not engine.undrafted
