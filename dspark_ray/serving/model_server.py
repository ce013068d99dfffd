"""The coordinator of one model instance: owns an engine, runs its step loop, streams deltas.

It is a plain class (a "shim" in Ray Serve LLM's words): the engine comes through the constructor,
so tests build it with any engine; `dspark_ray.serving.app` applies `serve.deployment` when the
application is built. The engine is not thread-safe, so every engine call happens on ONE loop
thread; requests and aborts reach it through an inbox, deltas leave through asyncio queues.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.serving.detokenizer import StreamingText
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest, SpeculativeStats

IDLE_WAIT_S = 0.05


@dataclass
class _Stream:
    request: CompletionRequest
    deltas: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    text: StreamingText
    seq: Sequence | None = None
    num_tokens_sent: int = 0


class ModelServer:
    def __init__(self, engine: SpeculativeEngine, decode: Callable[[list[int]], str], model_name: str) -> None:
        self.engine = engine
        self.decode = decode
        self.model_name = model_name
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, _Stream] = {}  # by seq_id, touched only on the loop thread
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        """Sequences holding engine state (waiting or running)."""
        return len(self._streams)

    async def generate(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        stream = _Stream(request, asyncio.Queue(), asyncio.get_running_loop(), StreamingText(self.decode))
        self._inbox.put(("add", stream))
        try:
            while True:
                delta = await stream.deltas.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:  # finished, or the client went away: free the sequence either way
            self._inbox.put(("abort", stream))

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(*message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, kind: str, stream: _Stream) -> None:
        if kind == "add":
            self._add(stream)
        elif stream.seq is not None and stream.seq.seq_id in self._streams:
            self.engine.abort([stream.seq.seq_id])
            del self._streams[stream.seq.seq_id]

    def _add(self, stream: _Stream) -> None:
        request = stream.request
        try:
            stream.seq = self.engine.add_request(GenerationRequest(
                request.prompt_token_ids, request.sampling, request.max_tokens, request.stop, request.ignore_eos))
        except ValueError as error:
            self._send(stream, CompletionDelta(request.request_id, [], "", len(request.prompt_token_ids), 0,
                                               finish_reason="error", error=str(error)))
            return
        self._streams[stream.seq.seq_id] = stream

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as error:  # a broken step fails its requests, never the server
            self._fail_all(f"engine step failed: {error}")
            return
        for stream in list(self._streams.values()):
            if stream.seq.output_token_ids or stream.seq.is_finished:
                self._emit(stream)
        for seq in finished:
            self._streams.pop(seq.seq_id, None)

    def _emit(self, stream: _Stream) -> None:
        seq = stream.seq
        new_tokens = seq.output_token_ids[stream.num_tokens_sent:]
        if not new_tokens and not seq.is_finished:
            return
        stream.num_tokens_sent = len(seq.output_token_ids)
        self._send(stream, CompletionDelta(
            request_id=stream.request.request_id,
            token_ids=new_tokens,
            text=stream.text.next_delta(seq),
            num_prompt_tokens=len(seq.request.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            finish_reason=seq.finish_reason.value if seq.is_finished else None,
            stats=_stats(seq) if seq.is_finished else None,
        ))

    def _fail_all(self, message: str) -> None:
        self.engine.abort(list(self._streams))
        for stream in self._streams.values():
            self._send(stream, CompletionDelta(stream.request.request_id, [], "", len(stream.request.prompt_token_ids),
                                               stream.num_tokens_sent, finish_reason="error", error=message))
        self._streams.clear()

    @staticmethod
    def _send(stream: _Stream, delta: CompletionDelta) -> None:
        stream.loop.call_soon_threadsafe(stream.deltas.put_nowait, delta)


def _stats(seq: Sequence) -> SpeculativeStats:
    stats = seq.stats
    return SpeculativeStats(stats.num_steps, stats.num_draft_tokens, stats.num_accepted_tokens,
                            list(stats.num_accepted_per_position))
