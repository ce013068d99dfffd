"""One engine's step loop: admits and aborts requests, steps, and turns each step into deltas.

It is the part of a model server that touches the engine, which is not thread-safe: every call
happens on ONE thread, a thread of the replica (`LoopThread`) or the main thread of an engine
process of its own (`dspark_ray.serving.engine_process`). Requests are named by a ticket the
caller picks; deltas leave through `send(ticket, delta)`.

When the verifier loses its state (`VerifierStateLost`: the target workers died), every open
request is added again as the continuation of what its client was sent, and waits for the new
workers (its deltas are whole steps, so what was sent ends where a step ended: greedy and seeded
sampled continuations draw what the lost run would have, `engine.sequence`); after `MAX_REPLAYS_IN_A_ROW` such losses without a step between them, they fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.engine.faults import VerifierStateLost
from dspark_ray.serving.detokenizer import StreamingText
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest, SpeculativeStats

# ("add", ticket, request) admits a request; ("abort", ticket, None) frees it (a no-op once finished).
Command = tuple[Literal["add", "abort"], int, CompletionRequest | None]
Send = Callable[[int, CompletionDelta], None]
IDLE_WAIT_S = 0.05  # how long an idle loop waits for a command before checking whether to stop
MAX_REPLAYS_IN_A_ROW = 3


@dataclass
class _Stream:
    ticket: int
    request: CompletionRequest
    text: StreamingText
    seq: Sequence | None = None
    num_tokens_sent: int = 0


class EngineLoop:
    def __init__(self, engine: SpeculativeEngine, decode: Callable[[list[int]], str], send: Send) -> None:
        self.engine = engine
        self.decode = decode
        self.send = send
        self._streams: dict[int, _Stream] = {}  # by seq_id
        self._seq_ids: dict[int, int] = {}  # seq_id by ticket
        self._num_replays_in_a_row = 0

    @property
    def num_active(self) -> int:
        """Sequences holding engine state (waiting or running)."""
        return len(self._streams)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def run(self, receive: Callable[[float], Command | None], keep_going: Callable[[], bool],
            after_iteration: Callable[[], None] | None = None) -> None:
        """Step while there is work; before each step, handle every command that has arrived.
        `receive(timeout)` returns the next command, or None when none came within `timeout`
        seconds (0: do not wait; the loop waits only while idle)."""
        while keep_going():
            timeout = 0.0 if self.has_work() else IDLE_WAIT_S
            while (command := receive(timeout)) is not None:
                self.handle(command)
                timeout = 0.0
            if self.has_work():
                self.step()
            if after_iteration is not None:
                after_iteration()

    def handle(self, command: Command) -> None:
        kind, ticket, request = command
        if kind == "add":
            self._add(ticket, request)
        elif (seq_id := self._seq_ids.pop(ticket, None)) is not None:
            self.engine.abort([seq_id])
            del self._streams[seq_id]

    def step(self) -> None:
        try:
            finished = self.engine.step()
        except VerifierStateLost as error:  # the target workers are being replaced: replay every request
            self.replay_all(f"engine step failed: {error}")
            return
        except Exception as error:  # the engine is down (EngineUnavailable), not one sequence: all its requests fail
            self.fail_all(f"engine step failed: {error}")
            return
        self._num_replays_in_a_row = 0
        for stream in list(self._streams.values()):
            if stream.seq.output_token_ids or stream.seq.is_finished:
                self._emit(stream)
        for seq in finished:
            stream = self._streams.pop(seq.seq_id, None)
            if stream is not None:
                del self._seq_ids[stream.ticket]

    def fail_all(self, message: str) -> None:
        for stream in self._take_all():
            self.send(stream.ticket, error_delta(stream.request, message, stream.num_tokens_sent))

    def replay_all(self, message: str) -> None:
        """Add every open request again, continuing from what its client was sent."""
        self._num_replays_in_a_row += 1
        if self._num_replays_in_a_row > MAX_REPLAYS_IN_A_ROW:
            self.fail_all(message)
            return
        for stream in self._take_all():
            sent = stream.seq.output_token_ids[:stream.num_tokens_sent]
            self._add(stream.ticket, stream.request.resumed(sent, stream.text.num_chars_sent))

    def _take_all(self) -> list[_Stream]:
        """Every open stream, its sequence aborted."""
        streams = list(self._streams.values())
        self.engine.abort(list(self._streams))
        self._streams.clear()
        self._seq_ids.clear()
        return streams

    def _add(self, ticket: int, request: CompletionRequest) -> None:
        try:
            seq = self.engine.add_request(GenerationRequest(
                request.prompt_token_ids, request.sampling, request.max_tokens, request.stop, request.ignore_eos,
                request.num_resumed_tokens))
        except ValueError as error:
            self.send(ticket, error_delta(request, str(error)))
            return
        self._streams[seq.seq_id] = _Stream(ticket, request, StreamingText(self.decode, request.num_resumed_chars), seq)
        self._seq_ids[ticket] = seq.seq_id

    def _emit(self, stream: _Stream) -> None:
        seq = stream.seq
        new_tokens = seq.output_token_ids[stream.num_tokens_sent:]
        if not new_tokens and not seq.is_finished:
            return
        stream.num_tokens_sent = len(seq.output_token_ids)
        self.send(stream.ticket, CompletionDelta(
            request_id=stream.request.request_id,
            token_ids=new_tokens,
            text=stream.text.next_delta(seq),
            num_prompt_tokens=stream.request.num_original_prompt_tokens,
            num_output_tokens=stream.request.num_resumed_tokens + len(seq.output_token_ids),
            finish_reason=seq.finish_reason.value if seq.is_finished else None,
            error=seq.error,  # a step failed because of this sequence alone (`SpeculativeEngine.step`)
            stats=_stats(seq) if seq.is_finished else None,
        ))


def error_delta(request: CompletionRequest, message: str, num_new_tokens: int = 0) -> CompletionDelta:
    """The end of a failed request that had sent `num_new_tokens` (besides those it resumed after)."""
    return CompletionDelta(request.request_id, [], "", request.num_original_prompt_tokens,
                           request.num_resumed_tokens + num_new_tokens, finish_reason="error", error=message)


def _stats(seq: Sequence) -> SpeculativeStats:
    stats = seq.stats
    return SpeculativeStats(stats.num_steps, stats.num_draft_tokens, stats.num_accepted_tokens,
                            list(stats.num_accepted_per_position))
