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
    num_resumed_tokens: int = 0  # a replay: the last n prompt tokens are completion already sent
    num_resumed_chars: int = 0  # a replay: characters of completion text already sent

    @property
    def num_original_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids) - self.num_resumed_tokens

    def resumed(self, sent_token_ids: list[int], num_chars_sent: int) -> CompletionRequest:
        """This request continued after `sent_token_ids` (its client has been sent them, and
        `num_chars_sent` characters of text in all): the replay of a request whose engine died."""
        return replace(self, prompt_token_ids=self.prompt_token_ids + sent_token_ids,
                       max_tokens=self.max_tokens - len(sent_token_ids),
                       num_resumed_tokens=self.num_resumed_tokens + len(sent_token_ids),
                       num_resumed_chars=num_chars_sent)


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
