"""Stop conditions: max_tokens, EOS, stop strings (also across draft blocks), the context limit.

`StopRules.append` is the only way tokens enter a sequence's output, so every path (prefill,
speculative step, target-only fallback) stops the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from dspark_ray.engine.sequence import FinishReason, Sequence

Decode = Callable[[list[int]], str]


class StopRules:
    def __init__(self, eos_token_ids: set[int], context_limit: int, decode: Decode | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.context_limit = context_limit
        self.decode = decode

    def append(self, seq: Sequence, new_tokens: list[int]) -> None:
        """Append verified tokens one by one until a stop condition fires."""
        num_before = len(seq.output_token_ids)
        for token in new_tokens:
            seq.output_token_ids.append(token)
            if token in self.eos_token_ids and not seq.request.ignore_eos:
                seq.finish_reason = FinishReason.STOP
            elif seq.remaining_tokens <= 0 or seq.num_tokens >= self.context_limit:
                seq.finish_reason = FinishReason.LENGTH
            if seq.finish_reason is not None:
                break
        if seq.request.stop:
            self._check_stop_strings(seq, num_before)

    def _check_stop_strings(self, seq: Sequence, num_before: int) -> None:
        if self.decode is None:
            raise ValueError("stop strings need a tokenizer")
        longest = max(len(stop) for stop in seq.request.stop)
        resumed = seq.request.num_resumed_tokens  # a replayed completion's text counts (see GenerationRequest)
        completion = seq.completion_token_ids
        previous_text = self.decode(completion[:resumed + num_before])
        text = self.decode(completion)
        search_from = max(0, len(previous_text) - longest + 1)
        found = [(text.find(stop, search_from), stop) for stop in seq.request.stop]
        found = [(index, stop) for index, stop in found if index >= 0]
        if not found:
            return
        # The match completed by the fewest tokens wins (then the earliest start), as if tokens came
        # one per step: how a block grouped them must not change the output.
        num_kept, index = min((self._tokens_covering(completion, index + len(stop), resumed + num_before), index)
                              for index, stop in found)
        seq.stop_text_end = index
        seq.finish_reason = FinishReason.STOP
        del seq.output_token_ids[num_kept - resumed:]

    def _tokens_covering(self, token_ids: list[int], num_chars: int, start: int) -> int:
        """Fewest output tokens whose text reaches `num_chars` characters."""
        for count in range(max(start, 1), len(token_ids) + 1):
            if len(self.decode(token_ids[:count])) >= num_chars:
                return count
        return len(token_ids)
