"""What flows between the ingress and a model server, after OpenAI-protocol validation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dspark_ray.core.sampling import SamplingParams


@dataclass(frozen=True)
class CompletionRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class SpeculativeStats:
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0


@dataclass(frozen=True)
class CompletionDelta:
    """A streamed piece of one completion; the last one carries finish_reason and stats."""

    request_id: str
    token_ids: list[int]  # new output tokens since the previous delta
    text: str  # new output text since the previous delta
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    stats: SpeculativeStats | None = None

    def followed_by(self, later: CompletionDelta) -> CompletionDelta:
        """This delta and the next one of the same completion, as one."""
        return replace(later, token_ids=self.token_ids + later.token_ids, text=self.text + later.text)
