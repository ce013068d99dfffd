"""KV caches of a batch of sequences with ragged lengths, over one HF `DynamicCache`.

Physically every row has the same number of slots `S`; each row's *valid* slots hold its cached
tokens in order, and invalid slots (padding, rolled-back draft tokens) are masked out. Rolling a
row back is therefore a mask update (no recomputation, no copy); `compact` gathers the valid slots
when holes dominate. Attention masks and position ids are built here and passed explicitly, so the
model never infers positions from the physical layout. Sliding-window and chunked layers keep all
their keys too; their windows are applied in the mask, by token position (`engine.attention_windows`).

This module knows nothing about drafts, sampling or which model it serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dspark_ray.engine.attention_windows import AttentionWindow, AttentionWindows

MAX_HOLE_FRACTION_INVERSE = 4  # compact once the slots exceed the longest row by a quarter ...
MIN_HOLES_BEFORE_COMPACTION = 16  # ... plus this many


@dataclass(frozen=True)
class ForwardInputs:
    input_ids: torch.Tensor  # [B, T] int64, padded
    position_ids: torch.Tensor  # [B, T] int64
    # [B, 1, T, S + T] additive float mask, or one such mask per layer type (`AttentionWindows.by_layer_type`)
    attention_mask: torch.Tensor | dict[str, torch.Tensor]
    query_valid: torch.Tensor  # [B, T] bool: False at padding
    num_query_tokens: list[int]  # [B] real tokens per row


class BatchKVCache:
    """A batch of per-sequence caches with verbs: append (via forward), truncate, select, merge, extend
    (empty rows), compact, and narrow (a forward over some rows only)."""

    def __init__(self, hf_cache: DynamicCache, num_rows: int, windows: AttentionWindows = AttentionWindows()) -> None:
        self.hf_cache = hf_cache
        self.windows = windows
        self.slot_valid = torch.zeros(num_rows, 0, dtype=torch.bool)  # [B, S]
        self.cached_tokens: list[list[int]] = [[] for _ in range(num_rows)]

    @property
    def num_rows(self) -> int:
        return len(self.cached_tokens)

    @property
    def num_slots(self) -> int:
        return self.slot_valid.shape[1]

    def prepare(self, token_lists: list[list[int]], pad_token_id: int, dtype: torch.dtype,
                max_position: int) -> ForwardInputs:
        """Inputs that append `token_lists[b]` to row b; call `commit` after the forward."""
        assert len(token_lists) == self.num_rows
        lengths = [len(tokens) for tokens in token_lists]  # [B]
        num_query = max(1, max(lengths, default=0))
        # built from host lists in one copy each: a decode step's inputs are tiny, and every small
        # tensor op costs more dispatch than arithmetic
        input_ids = torch.tensor([tokens + [pad_token_id] * (num_query - len(tokens)) for tokens in token_lists],
                                 dtype=torch.long).reshape(self.num_rows, num_query)
        query_valid = torch.tensor([[True] * length + [False] * (num_query - length) for length in lengths],
                                   dtype=torch.bool).reshape(self.num_rows, num_query)  # [B, T]
        positions = torch.tensor([[len(cached) + offset for offset in range(num_query)] for cached in self.cached_tokens],
                                 dtype=torch.long).reshape(self.num_rows, num_query)  # [B, T]
        return ForwardInputs(
            input_ids=input_ids,
            position_ids=positions.clamp(max=max_position - 1),
            attention_mask=self._attention_mask(query_valid, positions, dtype,
                                                one_each=lengths == [1] * self.num_rows),
            query_valid=query_valid,
            num_query_tokens=lengths,
        )

    def _attention_mask(self, query_valid: torch.Tensor, query_positions: torch.Tensor, dtype: torch.dtype,
                        one_each: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """`one_each`: every row gets exactly one new token (a decode step); with no holes in the
        cache and full attention its one query sees every slot, so the mask is all zeros, built in one op."""
        num_query, old_slots = query_valid.shape[1], self.num_slots
        if one_each and self.windows.all_full and bool(self.slot_valid.all()):
            return torch.zeros(self.num_rows, 1, 1, old_slots + 1, dtype=dtype)
        kv_valid = torch.cat([self.slot_valid, query_valid], dim=1)  # [B, S + T]
        kv_index = torch.arange(old_slots + num_query)
        query_slot = old_slots + torch.arange(num_query)  # [T]
        causal = kv_index[None, :] <= query_slot[:, None]  # [T, S + T]
        allowed = kv_valid[:, None, :] & causal[None]  # [B, T, S + T]
        # Every query sees at least itself, so padded queries never produce NaNs that would
        # leak into the cache (0 * NaN is NaN even behind a mask).
        itself = (kv_index[None, :] == query_slot[:, None])[None]  # [1, T, S + T]
        key_positions = None if self.windows.all_full else torch.cat(  # [B, S + T], at valid slots
            [self.slot_valid.cumsum(1) - 1, query_positions], dim=1)  # only windows need them

        def additive(window: AttentionWindow) -> torch.Tensor:
            seen = window.restrict(allowed, query_positions, key_positions) | itself
            blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
            return torch.where(seen, torch.zeros((), dtype=dtype), blocked)[:, None]  # [B, 1, T, S + T]

        if self.windows.by_layer_type is None:
            return additive(self.windows.uniform)
        masks = {window: additive(window) for window in set(self.windows.by_layer_type.values())}
        return {layer_type: masks[window] for layer_type, window in self.windows.by_layer_type.items()}

    def commit(self, token_lists: list[list[int]], inputs: ForwardInputs) -> None:
        """Record the slots the forward appended to the HF cache."""
        self.slot_valid = torch.cat([self.slot_valid, inputs.query_valid], dim=1)
        for cached, tokens in zip(self.cached_tokens, token_lists):
            cached.extend(tokens)

    def truncate(self, row: int, num_tokens: int) -> None:
        """Roll row back to its first `num_tokens` cached tokens."""
        if num_tokens >= len(self.cached_tokens[row]):
            return
        valid = self.slot_valid[row]
        self.slot_valid[row] = valid & (valid.cumsum(0) <= num_tokens)
        del self.cached_tokens[row][num_tokens:]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.slot_valid = self.slot_valid[index]
        self.cached_tokens = [self.cached_tokens[row] for row in rows]

    def merge(self, other: "BatchKVCache") -> None:
        """Append the rows of `other` after this cache's rows."""
        if self.num_rows == 0:
            self.hf_cache, self.slot_valid, self.cached_tokens = (
                other.hf_cache, other.slot_valid, other.cached_tokens)
            return
        num_slots = max(self.num_slots, other.num_slots)
        self._pad_slots(num_slots)
        other._pad_slots(num_slots)
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.slot_valid = torch.cat([self.slot_valid, other.slot_valid])
        self.cached_tokens.extend(other.cached_tokens)

    def extend(self, num_rows: int) -> None:
        """Append `num_rows` empty rows after this cache's rows (all their slots holes): a forward
        that feeds them their prompts prefills them beside the other rows' tokens."""
        for layer in self._layers():
            layer.keys = _pad_dim0(layer.keys, num_rows)
            layer.values = _pad_dim0(layer.values, num_rows)
        self.slot_valid = torch.cat([self.slot_valid, torch.zeros(num_rows, self.num_slots, dtype=torch.bool)])
        self.cached_tokens.extend([] for _ in range(num_rows))

    @contextmanager
    def narrowed(self, rows: list[int]) -> Iterator["BatchKVCache"]:
        """A cache of `rows` alone (in that order) for one forward, so the other rows cost it
        nothing. The HF cache holds copies of just those rows inside the block; after it they are
        written back and the other rows get the appended slots as holes, as if fed nothing. If
        the block raises, the cache is left as it was."""
        index = torch.tensor(rows, dtype=torch.long)
        full = [(layer, layer.keys, layer.values) for layer in self._layers()]
        for layer, keys, values in full:
            device_index = index.to(keys.device)
            layer.keys, layer.values = keys.index_select(0, device_index), values.index_select(0, device_index)
        part = BatchKVCache(self.hf_cache, 0, self.windows)
        part.slot_valid = self.slot_valid[index]
        part.cached_tokens = [self.cached_tokens[row] for row in rows]  # shared: commit extends ours
        try:
            yield part
        except BaseException:
            for layer, keys, values in full:
                layer.keys, layer.values = keys, values
            raise
        extra = part.num_slots - self.num_slots
        for layer, keys, values in full:
            layer.keys = _put_rows(_pad_dim2(keys, extra), index, layer.keys)
            layer.values = _put_rows(_pad_dim2(values, extra), index, layer.values)
        self.slot_valid = _put_rows(torch.cat([self.slot_valid, torch.zeros(self.num_rows, extra, dtype=torch.bool)],
                                              1), index, part.slot_valid)

    @contextmanager
    def undone_on_error(self) -> Iterator[None]:
        """A forward whose appends are undone if it raises midway (some layers appended, others
        not). An append gives a layer new tensors, so keeping the old ones copies nothing."""
        saved = [(layer, getattr(layer, "is_initialized", False), getattr(layer, "keys", None),
                  getattr(layer, "values", None)) for layer in self.hf_cache.layers]
        try:
            yield
        except BaseException:
            for layer, initialized, keys, values in saved:
                layer.keys, layer.values = keys, values
                if hasattr(layer, "is_initialized"):
                    layer.is_initialized = initialized
            raise

    def needs_compaction(self) -> bool:
        """Holes cost on every forward (the HF cache grows by concatenating all its slots, and
        attention spans every slot); compacting costs about one such copy. So compact as soon as
        a quarter of the longest row is holes: with the old threshold (twice the longest row) the
        draft LM at batch 16 ran 20% slower, and steps after a run of drafting paid for its holes."""
        longest = max((len(tokens) for tokens in self.cached_tokens), default=0)
        return self.num_slots > longest + longest // MAX_HOLE_FRACTION_INVERSE + MIN_HOLES_BEFORE_COMPACTION

    def compact(self) -> None:
        """Gather each row's valid slots to the front and drop trailing slots."""
        lengths = self.slot_valid.sum(1)  # [B]
        longest = int(lengths.max()) if self.num_rows else 0
        order = torch.sort((~self.slot_valid).to(torch.int8), dim=1, stable=True).indices
        index = order[:, :longest]  # [B, L]: valid slots first, in order
        for layer in self._layers():
            layer.keys = _gather_slots(layer.keys, index)
            layer.values = _gather_slots(layer.values, index)
        self.slot_valid = torch.arange(longest)[None, :] < lengths[:, None]

    def _pad_slots(self, num_slots: int) -> None:
        extra = num_slots - self.num_slots
        if extra == 0:
            return
        for layer in self._layers():
            layer.keys = _pad_dim2(layer.keys, extra)
            layer.values = _pad_dim2(layer.values, extra)
        self.slot_valid = torch.cat([self.slot_valid, torch.zeros(self.num_rows, extra, dtype=torch.bool)], 1)

    def _layers(self) -> list:
        """The layers holding keys and values (not those reusing another layer's: Gemma 4's KV sharing)."""
        return [layer for layer in self.hf_cache.layers
                if getattr(layer, "is_initialized", False) and layer.keys is not None]


def _gather_slots(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # states [B, H, S, D], index [B, L] -> [B, H, L, D]; the slot bookkeeping lives on the CPU
    expanded = index.to(states.device)[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return states.gather(2, expanded)


def _pad_dim2(states: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return states
    padding = states.new_zeros(states.shape[0], states.shape[1], extra, states.shape[3])
    return torch.cat([states, padding], dim=2)


def _pad_dim0(states: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([states, states.new_zeros(extra, *states.shape[1:])])


def _put_rows(states: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return states.index_copy_(0, index.to(states.device), rows)
