"""Build a ready engine from an `EngineConfig`: load models, check them, pick the drafter."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from dspark_ray.config import EngineConfig
from dspark_ray.dspark.io import load_dspark, read_dspark_config
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.engine.drafters.base import Drafter, NoDrafter
from dspark_ray.engine.drafters.draft_model import DraftModelDrafter
from dspark_ray.engine.drafters.dspark import DSparkDrafter
from dspark_ray.engine.drafters.mtp import MTPDrafter, capture_layer, load_mtp
from dspark_ray.engine.drafters.ngram import NgramDrafter
from dspark_ray.engine.drafters.scheduled import ConfidenceScheduledDrafter
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.governor import DraftingCap, DraftingPolicy, SpeculationGovernor
from dspark_ray.engine.loading import (check_shared_vocabulary, context_limit, load_causal_lm,
                                       load_tokenizer, vocab_size)
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from dspark_ray.target_record import check_record

DRAFT_NAMES = {"model": "the draft LM", "dspark": "the DSpark drafter"}


@dataclass
class LoadedModels:
    target: PreTrainedModel
    draft: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    dspark: DSparkModel | None = None  # drafter 'dspark' (borrows the target's embeddings and lm_head)
    mtp: PreTrainedModel | None = None  # drafter 'mtp': the target's MTP module (transformers' MtpModel)


def check_draft_target(config: EngineConfig) -> None:
    """Refuse a drafter made for another target (its target.json, or a draft LM's own tokenizer)."""
    if config.drafter in DRAFT_NAMES:
        check_record(config.draft, config.target, DRAFT_NAMES[config.drafter])


def load_models(config: EngineConfig) -> LoadedModels:
    check_draft_target(config)
    target = load_causal_lm(config.target, config.dtype, config.device)
    draft = None
    if config.drafter == "model":
        draft = load_causal_lm(config.draft, config.dtype, config.device)
        check_shared_vocabulary(target, draft)
    dspark = load_dspark(config.draft, target, config.dtype) if config.drafter == "dspark" else None
    mtp = load_mtp(target, config.draft) if config.drafter == "mtp" else None
    return LoadedModels(target, draft, load_tokenizer(config.target), dspark, mtp)


def build_engine(config: EngineConfig, models: LoadedModels) -> SpeculativeEngine:
    pad_token_id = models.tokenizer.pad_token_id or 0
    stop_rules = StopRules(eos_token_ids(models), context_limit(models.target),
                           lambda ids: models.tokenizer.decode(ids, skip_special_tokens=True))
    return SpeculativeEngine(
        TargetVerifier(CausalLMRunner(models.target, pad_token_id, capture_layers(config, models),
                                      config.packed_forwards, config.absorbed_mla)),
        schedule_verification(config, build_drafter(config, models, pad_token_id)),
        stop_rules,
        config.num_speculative_tokens,
        config.max_batch_size,
        drafting_governor(config),
        config.fused_prefill,
    )


def drafting_governor(config: EngineConfig) -> DraftingPolicy | None:
    """The load-aware drafting switch (and draft length: the full one or half of it) under the
    batch-size cap, unless there is nothing to switch or both are off."""
    if config.drafter == "none":
        return None
    governor = (SpeculationGovernor(short_limit=config.num_speculative_tokens // 2 or None)
                if config.load_aware_drafting else None)
    if config.max_drafting_batch_size is None:
        return governor
    return DraftingCap(config.max_drafting_batch_size, governor)


def build_drafter(config: EngineConfig, models: LoadedModels, pad_token_id: int) -> Drafter:
    if config.drafter == "model":
        return DraftModelDrafter(models.draft, config.num_speculative_tokens, config.adaptive_speculation,
                                 config.draft_confidence_threshold, pad_token_id)
    if config.drafter == "dspark":
        return DSparkDrafter(_require_dspark(models), config.num_speculative_tokens)
    if config.drafter == "mtp":
        if models.mtp is None:
            raise ValueError("drafter 'mtp' needs the target's loaded MTP module (LoadedModels.mtp)")
        return MTPDrafter(models.mtp, models.target, config.num_speculative_tokens, pad_token_id)
    if config.drafter == "ngram":
        return NgramDrafter(vocab_size(models.target), config.ngram_max, config.ngram_min)
    return NoDrafter()


def capture_layers(config: EngineConfig, models: LoadedModels) -> list[int] | None:
    """Target layers whose states the drafter needs (DSpark, MTP); None captures nothing."""
    if config.drafter == "mtp":
        return [capture_layer(models.target.config)]
    if config.drafter != "dspark":
        return None
    return list(_require_dspark(models).config.target_layer_ids)


def feature_layer_ids(config: EngineConfig) -> list[int] | None:
    """`capture_layers` for a process without the drafter (a target worker): read from the DSpark
    drafter's config file (DSpark) or the target's (MTP) alone; None for other drafters."""
    if config.drafter == "mtp":
        return [capture_layer(AutoConfig.from_pretrained(config.target, local_files_only=True))]
    if config.drafter != "dspark":
        return None
    return list(read_dspark_config(config.draft).target_layer_ids)


def _require_dspark(models: LoadedModels) -> DSparkModel:
    if models.dspark is None:
        raise ValueError("drafter 'dspark' needs a loaded DSpark drafter (LoadedModels.dspark)")
    return models.dspark


def schedule_verification(config: EngineConfig, drafter: Drafter) -> Drafter:
    """With verification_schedule 'confidence', cut drafts to the prefix scheduler's lengths."""
    if config.verification_schedule == "fixed":
        return drafter
    return ConfidenceScheduledDrafter.from_files(drafter, config.target, config.sps_profile, config.draft)


def eos_token_ids(models: LoadedModels) -> set[int]:
    configured = models.target.generation_config.eos_token_id
    if configured is None:
        configured = models.tokenizer.eos_token_id
    if configured is None:
        return set()
    return set(configured) if isinstance(configured, list) else {configured}
