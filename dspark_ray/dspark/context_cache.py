"""Per-sequence cache of the drafter's context keys/values, one entry per committed token.

Entry i holds, for every backbone layer, the key and value of token i computed from the target's
captured states of that token. Only tokens the target has cached (all committed tokens but the
last) have entries. Verbs: `append` (new entries), `truncate` (roll back to n tokens), `batch`
(a padded view of several sequences with a validity mask). Buffers grow by doubling, so appends
cost no copy of the past.

This module knows nothing about models or the engine.
"""

from __future__ import annotations

import torch


class ContextCache:
    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}  # seq_id -> [capacity, *entry_shape]
        self._lengths: dict[int, int] = {}

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._lengths

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def add(self, seq_id: int) -> None:
        self._lengths[seq_id] = 0

    def remove(self, seq_id: int) -> None:
        self._buffers.pop(seq_id, None)
        self._lengths.pop(seq_id, None)

    def append(self, seq_id: int, entries: torch.Tensor) -> None:
        """entries `[N, *entry_shape]` become tokens length .. length + N - 1."""
        start, count = self._lengths[seq_id], entries.shape[0]
        buffer = self._buffers.get(seq_id)
        if buffer is None or buffer.shape[0] < start + count:
            capacity = max(64, 2 * (start + count))
            grown = entries.new_empty(capacity, *entries.shape[1:])
            if buffer is not None:
                grown[:start] = buffer[:start]
            self._buffers[seq_id] = buffer = grown
        buffer[start : start + count] = entries
        self._lengths[seq_id] = start + count

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        self._lengths[seq_id] = min(self._lengths[seq_id], num_tokens)

    def batch(self, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded entries `[B, S, *entry_shape]` and validity `[B, S]` bool (S = longest length, >= 1)."""
        longest = max([1, *(self._lengths[seq_id] for seq_id in seq_ids)])
        if len(seq_ids) == 1 and self._lengths[seq_ids[0]] == longest:  # batch 1: a view, no copy
            entries = self._buffers[seq_ids[0]][None, :longest]
            return entries, torch.ones(1, longest, dtype=torch.bool, device=entries.device)
        template = next(buffer for buffer in self._buffers.values())
        entries = template.new_zeros(len(seq_ids), longest, *template.shape[1:])
        valid = torch.zeros(len(seq_ids), longest, dtype=torch.bool, device=template.device)
        for row, seq_id in enumerate(seq_ids):
            length = self._lengths[seq_id]
            if length:
                entries[row, :length] = self._buffers[seq_id][:length]
                valid[row, :length] = True
        return entries, valid
