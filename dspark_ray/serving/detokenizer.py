"""Incremental detokenization for streaming: never emit half a UTF-8 character or a prefix of a
stop string that may still match. A replayed request's stream starts where its client's text
ended (`num_chars_sent`)."""

from __future__ import annotations

from collections.abc import Callable

from dspark_ray.engine.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"


class StreamingText:
    def __init__(self, decode: Callable[[list[int]], str], num_chars_sent: int = 0) -> None:
        self.decode = decode
        self.num_chars_sent = num_chars_sent

    def next_delta(self, seq: Sequence) -> str:
        text = self.decode(seq.completion_token_ids)
        if seq.is_finished:
            end = len(text) if seq.stop_text_end is None else seq.stop_text_end
        else:
            end = len(text.rstrip(REPLACEMENT_CHAR))  # an incomplete multi-byte character
            if seq.request.stop:
                end = min(end, len(text) - max(len(stop) for stop in seq.request.stop) + 1)
        delta = text[self.num_chars_sent : max(end, self.num_chars_sent)]
        self.num_chars_sent += len(delta)
        return delta
