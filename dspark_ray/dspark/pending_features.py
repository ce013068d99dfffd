"""Per-sequence captured target features that the drafter has not yet projected into context K/V.

The DSpark drafter keeps them until a sequence next drafts and projects them then, all of a
proposal's rows in one batched projection: while the load-aware governor has drafting off (high
load, where every millisecond of a step counts), keeping the context costs no projection at all,
and a sequence that never drafts again never pays for its last tokens. Verbs: `append` (features of
newly cached tokens; `append_captured` for a forward's batch), `truncate` (keep the first n pending tokens), `take` (all of them, removed).

This module knows nothing about models or the engine.
"""

from __future__ import annotations

import torch


class PendingFeatures:
    def __init__(self) -> None:
        self._chunks: dict[int, list[torch.Tensor]] = {}  # seq_id -> [N_i, F] chunks in token order
        self._lengths: dict[int, int] = {}  # seq_id -> sum of N_i

    def length(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def append(self, seq_id: int, features: torch.Tensor) -> None:
        """features `[N, F]` follow the sequence's pending ones."""
        if len(features):
            self._chunks.setdefault(seq_id, []).append(features)
            self._lengths[seq_id] = self.length(seq_id) + len(features)

    def append_captured(self, captured: dict[int, torch.Tensor] | None, seq_ids: list[int]) -> None:
        """`append` the features a forward captured (seq_id -> `[N, F]`; None: none) of `seq_ids`."""
        for seq_id in seq_ids:
            if captured and seq_id in captured:
                self.append(seq_id, captured[seq_id])

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep the first `num_tokens` (a step cuts only its own, last chunk: the rest stay as they are)."""
        excess = self.length(seq_id) - num_tokens
        if excess <= 0:
            return
        if num_tokens <= 0:
            self.remove(seq_id)
            return
        chunks = self._chunks[seq_id]
        self._lengths[seq_id] = num_tokens
        while excess >= len(chunks[-1]):
            excess -= len(chunks.pop())
        if excess:
            chunks[-1] = chunks[-1][: len(chunks[-1]) - excess]

    def take(self, seq_id: int) -> torch.Tensor | None:
        """The pending features `[N, F]` (None if none), no longer pending."""
        chunks = self._chunks.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        return None if chunks is None else torch.cat(chunks)

    def remove(self, seq_id: int) -> None:
        self._chunks.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
