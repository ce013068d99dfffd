"""Confidence-scheduled verification as a drafter wrapper: after the inner drafter proposes, each
row's draft is cut to the length DSpark's prefix scheduler picks for the whole batch.

Cutting a draft is lossless: the verifier sees a shorter draft with the exact distributions its
tokens were sampled from. Under sampling this also needs the decision to verify draft j to be
blind to the token x_j itself; `dspark_ray.core.scheduling` explains why its early stopping is,
given confidence logits that depend on the drafted prefix x_{<j} only (DSpark's head does).

The step cost is modelled as the engine pays it: `CausalLMRunner` pads every row of the
verification forward to the longest, so by default (`padded=True`) the scheduler picks one cap for
the batch (see `dspark_ray.core.scheduling`); `padded=False` is the paper's ragged cost, for a
verifier that packs rows without padding.

Proposals without confidence logits pass through untouched. The wrapper knows nothing about
models: it holds the calibration temperatures and the target's SPS(B) curve.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence as SequenceOf
from pathlib import Path

import torch

from dspark_ray.core.calibration import Calibration, survival_probs
from dspark_ray.core.scheduling import SpsCurve, VerificationSchedule, schedule_by_confidence
from dspark_ray.engine.drafters.base import DraftProposal, Drafter, TargetFeatures
from dspark_ray.engine.profile import default_profile_path, load_sps_curve
from dspark_ray.engine.sequence import Sequence

CALIBRATION_FILE = "calibration.json"  # in the drafter's directory


class ConfidenceScheduledDrafter:
    def __init__(self, drafter: Drafter, curve: SpsCurve, temperatures: SequenceOf[float] | None = None,
                 padded: bool = True) -> None:
        self.drafter = drafter
        self.curve = curve
        self.temperatures = list(temperatures) if temperatures else None
        self.padded = padded
        self.last_schedule: VerificationSchedule | None = None  # of the latest scheduled proposal

    @classmethod
    def from_files(cls, drafter: Drafter, target_dir: Path, sps_profile: Path | None,
                   draft_dir: Path | None) -> "ConfidenceScheduledDrafter":
        """The target's SPS profile (required) and the drafter's calibration.json (temperature 1 without)."""
        profile = Path(sps_profile) if sps_profile is not None else default_profile_path(target_dir)
        if not profile.is_file():
            raise ValueError(f"verification schedule 'confidence' needs the target's SPS profile; {profile} does not "
                             f"exist (measure it with: dspark-ray profile --target {target_dir} --out {profile})")
        calibration = load_calibration(draft_dir) if draft_dir is not None else None
        return cls(drafter, load_sps_curve(profile), calibration.temperatures if calibration else None)

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        self.drafter.add(seqs, target_features)

    def remove(self, seq_ids: list[int]) -> None:
        self.drafter.remove(seq_ids)

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        proposal = self.drafter.propose(seqs, max_draft_tokens, time_budget_s)
        if proposal.confidence_logits is None or proposal.draft_token_ids.shape[1] == 0:
            return proposal
        survival = survival_probs(proposal.confidence_logits, self.temperatures)  # [B, K]
        self.last_schedule = schedule_by_confidence(survival, proposal.num_draft_tokens, self.curve, self.padded)
        return truncate_proposal(proposal, self.last_schedule.num_verify_tokens)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        self.drafter.on_verified(seqs, num_drafted, num_accepted, target_features)


def truncate_proposal(proposal: DraftProposal, num_draft_tokens: torch.Tensor) -> DraftProposal:
    """Keep the first num_draft_tokens[b] (<= proposed) drafts of each row. # num_draft_tokens [B]"""
    kept = torch.minimum(num_draft_tokens.long(), proposal.num_draft_tokens)  # [B]
    width = int(kept.max()) if kept.numel() else 0
    return dataclasses.replace(
        proposal,
        draft_token_ids=proposal.draft_token_ids[:, :width],
        num_draft_tokens=kept,
        draft_probs=None if proposal.draft_probs is None else proposal.draft_probs[:, :width],
        confidence_logits=None if proposal.confidence_logits is None else proposal.confidence_logits[:, :width],
    )


def load_calibration(draft_dir: Path) -> Calibration | None:
    path = Path(draft_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the calibration {path}: {error}") from error


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write `calibration` as JSON to `path` (a drafter keeps it as <dir>/calibration.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
