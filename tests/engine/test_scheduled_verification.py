"""Confidence-scheduled verification in the engine (ConfidenceScheduledDrafter): greedy output
stays identical to the target alone; verified draft lengths follow the SPS curve; files load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dspark_ray.config import EngineConfig
from dspark_ray.core.calibration import AcceptanceRecords, calibrate
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.core.scheduling import SpsCurve
from dspark_ray.engine.drafters.base import DraftProposal, NoDrafter
from dspark_ray.engine.drafters.draft_model import DraftModelDrafter
from dspark_ray.engine.drafters.scheduled import (
    ConfidenceScheduledDrafter,
    load_calibration,
    save_calibration,
    truncate_proposal,
)
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.factory import schedule_verification
from dspark_ray.engine.profile import ProfileSettings, default_profile_path, load_sps_curve, measure_profile, save_profile
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from harness import ConfidenceOverlay

pytestmark = pytest.mark.engine

VOCAB = 96
K = 5
FLAT = SpsCurve.from_measurements([1, 512], [100.0, 100.0])
PROPORTIONAL = SpsCurve.from_measurements([1, 512], [100.0, 100.0 / 512])
PROMPTS = [[5, 17, 33, 2], [40, 41], [7, 8, 9, 10, 11, 12, 13], [90]]


@pytest.fixture(scope="module")
def models():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the target cut to its first layer
    return target, draft


class ConfidentDrafter(ConfidenceOverlay):
    """A draft LM whose proposals carry confidence logits that depend on the drafted prefix only:
    falling with the position, nudged by the previous token."""

    def __init__(self, draft) -> None:
        super().__init__(DraftModelDrafter(draft, K, adaptive="off"))
        self.proposals: list[DraftProposal] = []

    def confidence_logits(self, previous, positions):
        return 2.5 - positions.float() + 0.3 * ((previous % 5).float() - 2)  # [B, K]

    def propose(self, seqs, max_draft_tokens, time_budget_s=None):
        proposal = super().propose(seqs, max_draft_tokens)
        self.proposals.append(proposal)
        return proposal


def make_engine(target, drafter) -> SpeculativeEngine:
    return SpeculativeEngine(TargetVerifier(CausalLMRunner(target)), drafter, StopRules(set(), 128), K,
                             max_batch_size=8)


def generate(target, drafter, max_tokens: int = 16, sampling: SamplingParams = SamplingParams()):
    requests = [GenerationRequest(prompt, sampling, max_tokens=max_tokens) for prompt in PROMPTS]
    return make_engine(target, drafter).generate(requests)


@pytest.fixture(scope="module")
def target_only(models):
    return [seq.output_token_ids for seq in generate(models[0], NoDrafter())]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("curve_name, curve", [("flat", FLAT), ("proportional", PROPORTIONAL),
                                               ("linear", SpsCurve.linear(0.01, 0.002, max_tokens=64))])
def test_greedy_output_is_identical_to_the_target_alone(models, target_only, curve_name, curve, padded):
    target, draft = models
    scheduled = ConfidenceScheduledDrafter(ConfidentDrafter(draft), curve, temperatures=[1.5, 1.0], padded=padded)
    assert [seq.output_token_ids for seq in generate(target, scheduled)] == target_only


@pytest.mark.parametrize("padded", [False, True])
def test_verified_lengths_follow_the_curve(models, padded):
    target, draft = models
    drafted, accepted = {}, {}
    for name, curve in [("flat", FLAT), ("linear", SpsCurve.linear(0.01, 0.004, max_tokens=64)),
                        ("proportional", PROPORTIONAL)]:
        inner = ConfidentDrafter(draft)
        scheduled = ConfidenceScheduledDrafter(inner, curve, padded=padded)
        seqs = generate(target, scheduled)
        proposed = sum(int(p.num_draft_tokens.sum()) for p in inner.proposals)
        drafted[name] = sum(seq.stats.num_draft_tokens for seq in seqs) / proposed
        accepted[name] = sum(seq.stats.num_accepted_tokens for seq in seqs)
        if padded:  # one cap per step: every row verifies min(drafted, cap)
            last = scheduled.last_schedule.num_verify_tokens
            cap = int(last.max())
            scheduled_proposal = next(p for p in reversed(inner.proposals) if p.draft_token_ids.shape[1])
            assert last.tolist() == scheduled_proposal.num_draft_tokens.clamp(max=cap).tolist()
    assert drafted["flat"] == 1.0
    assert 0 < accepted["flat"] < proposed  # drafts are neither always nor never accepted
    assert 0.0 < drafted["linear"] < 1.0
    assert drafted["proportional"] == 0.0


def test_sampling_with_truncated_drafts_is_seeded_and_deterministic(models):
    target, draft = models
    curve = SpsCurve.linear(0.01, 0.003, max_tokens=64)
    runs = [[seq.output_token_ids for seq in generate(
        target, ConfidenceScheduledDrafter(ConfidentDrafter(draft), curve),
        sampling=SamplingParams(temperature=1.0, seed=7))] for _ in range(2)]
    assert runs[0] == runs[1] and all(len(tokens) == 16 for tokens in runs[0])


def test_proposals_without_confidence_pass_through(models):
    _, draft = models
    inner = DraftModelDrafter(draft, K, adaptive="off")
    scheduled = ConfidenceScheduledDrafter(inner, PROPORTIONAL)
    seqs = generate(models[0], scheduled, max_tokens=8)
    assert sum(seq.stats.num_draft_tokens for seq in seqs) > 0 and scheduled.last_schedule is None


def test_truncation_keeps_the_exact_draft_distributions():
    probs = torch.softmax(torch.randn(2, 4, 7), -1)
    proposal = DraftProposal(torch.arange(8).view(2, 4), torch.tensor([4, 2]), probs, torch.randn(2, 4))
    cut = truncate_proposal(proposal, torch.tensor([1, 3]))
    assert cut.num_draft_tokens.tolist() == [1, 2]  # never more than proposed
    assert cut.drafts(0) == [0] and cut.drafts(1) == [4, 5]
    assert cut.draft_token_ids.shape == (2, 2)
    assert torch.equal(cut.draft_probs, probs[:, :2]) and torch.equal(cut.confidence_logits,
                                                                      proposal.confidence_logits[:, :2])
    assert truncate_proposal(proposal, torch.tensor([0, 0])).draft_token_ids.shape == (2, 0)


def test_files_profile_and_calibration(models, tmp_path: Path):
    target, _ = models
    target_dir, draft_dir = tmp_path / "target", tmp_path / "drafter"
    draft_dir.mkdir()
    with pytest.raises(ValueError, match="dspark-ray profile"):
        ConfidenceScheduledDrafter.from_files(NoDrafter(), target_dir, None, draft_dir)
    profile = measure_profile(target, ProfileSettings(max_tokens_per_batch=16, context_length=16, num_repeats=2,
                                                      num_warmup=0), progress=False)
    assert profile["num_tokens"] == [1, 2, 4, 8, 16]
    assert [p["num_sequences"] for p in profile["points"]] == [1, 1, 1, 1, 2]
    save_profile(profile, default_profile_path(target_dir))
    assert default_profile_path(target_dir) == tmp_path / "target_profile.json"
    curve = load_sps_curve(default_profile_path(target_dir))
    assert bool((curve.step_time_s[1:] >= curve.step_time_s[:-1]).all())

    assert load_calibration(draft_dir) is None
    records = AcceptanceRecords.from_steps([[2.0, 1.0]] * 30 + [[2.0, 1.0]] * 30, [2] * 30 + [0] * 30)
    save_calibration(calibrate(records), draft_dir / "calibration.json")
    scheduled = ConfidenceScheduledDrafter.from_files(NoDrafter(), target_dir, None, draft_dir)
    assert scheduled.temperatures == load_calibration(draft_dir).temperatures
    (draft_dir / "calibration.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="calibration"):
        load_calibration(draft_dir)

    fixed = EngineConfig(target=target_dir, draft=draft_dir, drafter="ngram")
    assert isinstance(schedule_verification(fixed, NoDrafter()), NoDrafter)
    confidence = EngineConfig(target=target_dir, draft=None, drafter="ngram", verification_schedule="confidence",
                              sps_profile=default_profile_path(target_dir))
    assert isinstance(schedule_verification(confidence, NoDrafter()), ConfidenceScheduledDrafter)
