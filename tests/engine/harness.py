"""Wiring for engine tests: an in-process engine over a tiny target with a drafter picked by name,
and mismatch reports that say whether a differing token was a numerical near-tie."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

import torch

from transformers import PreTrainedModel

from dspark_ray.engine.drafters.base import Drafter, NoDrafter
from dspark_ray.engine.drafters.draft_model import DraftModelDrafter
from dspark_ray.engine.drafters.ngram import NgramDrafter
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.loading import context_limit, vocab_size
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from tiny_models import PAD_TOKEN_ID, top2_gap

# The drafters every greedy-identity case runs; 'model-*' is the tiny draft LM with that adaptive
# schedule. `make_drafter` also knows 'echo': the target drafting for itself (every draft accepted,
# so each step emits exactly num_speculative_tokens + 1 tokens).
DRAFTERS = ("model-off", "model-confidence", "model-heuristic", "ngram", "none")

# arch -> how well its tiny draft agrees with the target, measured by test_greedy_identity and
# printed once at the end of the session (conftest.pytest_terminal_summary).
DRAFT_QUALITY: dict[str, str] = {}


def make_drafter(kind: str, target: PreTrainedModel, draft: PreTrainedModel | None,
                 num_speculative_tokens: int) -> Drafter:
    if kind.startswith("model-"):
        return DraftModelDrafter(draft, num_speculative_tokens, adaptive=kind.removeprefix("model-"),
                                 confidence_threshold=0.3, pad_token_id=PAD_TOKEN_ID)
    if kind == "echo":
        return DraftModelDrafter(target, num_speculative_tokens, adaptive="off", pad_token_id=PAD_TOKEN_ID)
    if kind == "ngram":
        return NgramDrafter(vocab_size(target), max_ngram=4, min_ngram=1)
    if kind == "none":
        return NoDrafter()
    raise ValueError(f"unknown drafter {kind!r}")


def make_engine(target: PreTrainedModel, drafter: Drafter, num_speculative_tokens: int = 3, *,
                eos_token_ids: Iterable[int] = (), limit: int | None = None,
                decode: Callable[[list[int]], str] | None = None, max_batch_size: int = 32) -> SpeculativeEngine:
    stop_rules = StopRules(set(eos_token_ids), context_limit(target) if limit is None else limit, decode)
    return SpeculativeEngine(TargetVerifier(CausalLMRunner(target, PAD_TOKEN_ID)), drafter, stop_rules,
                             num_speculative_tokens, max_batch_size)


def mismatch_report(target: PreTrainedModel, prompt: list[int], actual: list[int], expected: list[int]) -> str:
    """Where two greedy outputs first differ and the target's top-2 logit gap there."""
    if actual == expected:
        return "identical"
    index = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
    gap = top2_gap(target, prompt + expected[:index])
    return (f"prompt {prompt}: first difference at output position {index} "
            f"(engine {actual[index:index + 3]}, target alone {expected[index:index + 3]}, "
            f"len {len(actual)} vs {len(expected)}); target top-2 logit gap there: {gap:.3g}"
            f"{' (a near-tie)' if gap < 1e-5 else ''}")


class ConfidenceOverlay:
    """Wraps a drafter so its proposals carry confidence logits computed by `confidence_logits`
    from each drafted token's predecessor x_{k-1} (never from the token itself)."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner

    def add(self, seqs, target_features=None):
        self.inner.add(seqs, target_features)

    def remove(self, seq_ids):
        self.inner.remove(seq_ids)

    def on_verified(self, seqs, num_drafted, num_accepted, target_features=None):
        self.inner.on_verified(seqs, num_drafted, num_accepted, target_features)

    def propose(self, seqs, max_draft_tokens, time_budget_s=None):
        proposal = self.inner.propose(seqs, max_draft_tokens)
        anchors = torch.tensor([seq.token_ids[-1] for seq in seqs])[:, None]  # [B, 1]
        previous = torch.cat([anchors, proposal.draft_token_ids[:, :-1]], dim=1)  # [B, K]: x_{k-1}
        positions = torch.arange(proposal.draft_token_ids.shape[1])[None, :]  # [1, K]
        return dataclasses.replace(proposal, confidence_logits=self.confidence_logits(previous, positions))

    def confidence_logits(self, previous: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Alternating:
    """A drafting policy that cycles through full drafting, none, and at most 2 drafts per step
    (deterministic, for tests); `recorded` holds (drafted, tokens) of each recorded step."""

    def __init__(self) -> None:
        self._limits = itertools.cycle([None, 0, 2])
        self.recorded: list[tuple[bool, int]] = []
        self.limits: list[int | None] = []

    def draft_limit(self, batch_size: int) -> int | None:
        return next(self._limits)

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        self.recorded.append((draft_limit != 0, num_tokens))
        self.limits.append(draft_limit)
