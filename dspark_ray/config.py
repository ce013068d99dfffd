"""Validated configuration shared by the CLI, the engine and (later) the serving layer.

Pydantic v2 models, frozen, no unknown keys. The core math never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspark_ray.target_record import read_record

REFERENCE_DIR = Path(__file__).parent / "assets" / "reference"
DEFAULT_TARGET_DIR = REFERENCE_DIR / "target"
DEFAULT_DRAFT_DIR = REFERENCE_DIR / "draft"
DEFAULT_DSPARK_DIR = REFERENCE_DIR / "dspark"
DEFAULT_DSPARK_PARALLEL_ONLY_DIR = REFERENCE_DIR / "dspark_parallel_only"
BUNDLED_DRAFTS = {"model": DEFAULT_DRAFT_DIR, "dspark": DEFAULT_DSPARK_DIR}

DrafterKind = Literal["model", "dspark", "mtp", "ngram", "none"]
DType = Literal["float32", "bfloat16", "float16"]


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def resolve_target(target: Path | str | None, artifacts: list[Path | str | None]) -> Path:
    """The target named, else the one the first artifact records (target.json), else the bundled one:
    bundled defaults only when nothing names a target."""
    if target is not None:
        return Path(target)
    for artifact in artifacts:
        record = read_record(artifact)
        if record is not None:
            return Path(record.target)
    return DEFAULT_TARGET_DIR


def bundled_draft(drafter: str, target: Path) -> Path | None:
    """The bundled drafter of this kind, only for the bundled target (it belongs to no other)."""
    if drafter not in BUNDLED_DRAFTS:
        return None
    if Path(target).resolve() != DEFAULT_TARGET_DIR.resolve():
        flag = "--draft" if drafter == "model" else "--draft (a DSpark drafter trained for it)"
        raise ValueError(f"drafter {drafter!r} for target {target} needs {flag}: the bundled drafter belongs "
                         "to the bundled target")
    return BUNDLED_DRAFTS[drafter]


class EngineConfig(FrozenModel):
    """What one engine instance loads and how it speculates."""

    target: Path = Field(
        DEFAULT_TARGET_DIR,
        description="HF causal-LM directory of the target model (default: the one the draft records, else bundled).")
    draft: Path | None = Field(
        None,
        description=("Draft directory: the draft LM's HF directory for drafter 'model', a DSpark drafter "
                     "directory for drafter 'dspark' (default: the bundled one, for the bundled target only), the "
                     "checkpoint holding the target's MTP layer for drafter 'mtp' (default: the target's own)."),
    )
    drafter: DrafterKind = Field(
        "model",
        description=("How drafts are proposed: 'model', 'dspark', 'mtp' (the target's own next-token-prediction "
                     "layer, as DeepSeek-V3 checkpoints ship it), 'ngram' or 'none'."),
    )
    num_speculative_tokens: int = Field(
        8, ge=1, le=64, description="Most draft tokens proposed per sequence and step."
    )
    adaptive_speculation: Literal["off", "confidence", "heuristic"] = Field(
        "confidence",
        description=(
            "Per-step draft length for drafter 'model': 'confidence' stops drafting a sequence once the "
            "draft's probability of its own token falls below draft_confidence_threshold; 'heuristic' is "
            "HF's schedule (+2 after a fully accepted draft, -1 otherwise); 'off' always drafts "
            "num_speculative_tokens."
        ),
    )
    draft_confidence_threshold: float = Field(
        0.3, ge=0.0, le=1.0, description="Confidence below which drafting stops (adaptive 'confidence')."
    )
    ngram_max: int = Field(4, ge=1, le=16, description="Longest n-gram matched by drafter 'ngram'.")
    ngram_min: int = Field(1, ge=1, le=16, description="Shortest n-gram matched by drafter 'ngram'.")
    dtype: DType = Field("float32", description="Weights and activations dtype of both models.")
    device: str = Field("cpu", description="torch device of both models, e.g. 'cpu' or 'cuda:0'.")
    max_batch_size: int = Field(32, ge=1, description="Most sequences decoded together.")
    verification_schedule: Literal["fixed", "confidence"] = Field(
        "fixed",
        description=(
            "How many of its drafts each sequence sends to the target per step: 'fixed' verifies all of "
            "them; 'confidence' lets DSpark's prefix scheduler cut each draft to the length that maximises "
            "expected tokens x target steps per second, from the drafter's calibrated confidence (its "
            "calibration.json) and the target's SPS profile. Drafters without a confidence head verify all."
        ),
    )
    sps_profile: Path | None = Field(
        None,
        description=(
            "SPS(B) profile of the target (JSON from `dspark-ray profile`) for verification_schedule "
            "'confidence'; default: <target>_profile.json next to the target directory."
        ),
    )
    load_aware_drafting: bool = Field(
        True,
        description=(
            "Time steps with and without drafting at each batch size (powers of two) and draft only where "
            "it commits more tokens per second, so speculation never runs slower than the target alone by "
            "more than the exploration costs; while drafting, time the full draft length against half of it "
            "and keep the faster. Greedy sequences only: sampled ones always draft their full length, so "
            "their seeded outputs never depend on timing. Off: always draft the full length."
        ),
    )

    max_drafting_batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Greedy sequences draft only in steps of at most this many sequences; larger steps decode with "
            "the target alone, with no explorations (vLLM's speculative disable_by_batch_size). For a "
            "drafter known not to pay above some load. At or below it, load_aware_drafting decides as "
            "before. Sampled sequences are not capped (their seeded outputs never depend on the batch). "
            "None: no cap."
        ),
    )

    packed_forwards: bool = Field(
        True,
        description=(
            "Feed the target's ragged forwards (drafts of different lengths, prompts of different lengths) "
            "packed: only real tokens go through its linear layers and experts, attention keeps the padded "
            "per-sequence layout. Needs sdpa attention (others run padded). Off: pad every row to the longest."
        ),
    )
    fused_prefill: bool = Field(
        True,
        description=(
            "Prefill newly admitted prompts in the same target forward as the running sequences' "
            "verification (a mixed batch, as vLLM's and SGLang's schedulers build), instead of a forward of "
            "their own before it: prompts of up to 64 tokens with packed forwards (they attend apart from the "
            "other rows; for an MLA target no longer than absorbed attention pays for, 63 on the bundled one), "
            "of up to 16 with padded forwards (a prompt pads every row's attention to its length); longer "
            "prompts still get their own. On the worker actors' path the target always prefills in a call of "
            "its own. Off: every prompt in a forward of its own."
        ),
    )
    absorbed_mla: bool = Field(
        True,
        description=(
            "MLA targets (DeepSeek-V2/V3): attend over the cached latents with kv_b_proj absorbed into the "
            "queries and outputs, instead of expanding every cached slot into per-head keys and values at "
            "every forward (HF's form), in forwards of few new tokens a row (decode, verification). Needs "
            "sdpa attention. Off: HF's expanded form."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _bundled_defaults(cls, fields):
        if not isinstance(fields, dict):
            return fields
        target = resolve_target(fields.get("target"), [fields.get("draft")])
        drafter = fields.get("drafter", "model")
        own_mtp = target if drafter == "mtp" else None  # the MTP layer the target ships
        draft = fields.get("draft") or own_mtp or bundled_draft(drafter, target)
        return {**fields, "target": target, "draft": draft}

    @model_validator(mode="after")
    def _check_drafter_inputs(self) -> "EngineConfig":
        if self.drafter == "model" and self.draft is None:
            raise ValueError("drafter 'model' needs a draft model directory (draft)")
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must be <= ngram_max")
        return self
