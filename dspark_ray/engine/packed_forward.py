"""Packed forwards: a ragged batch's tokens go through the model without padding.

A batch forward over rows with different numbers of new tokens (ragged drafts, a prompt next to
one-token rows) is padded to `[B, T_max]`. Everything but attention works token by token, so the
padding costs linear layers and experts as much as real tokens do (docs/design/reasons.md). Packing feeds the `N` real tokens as ONE
row `[1, N]` (the way vLLM flattens a batch) and restores the padded per-row layout only where rows
must stay apart: the KV cache update and attention, which keep `BatchKVCache`'s layout and mask
unchanged. Padded positions then cost attention (cheap next to the experts) and nothing else.

Attention runs in groups of rows: the rows of up to `SHORT_ROW_QUERIES` new tokens (decode and
verification rows: 1 + drafts) attend with their own query count and keys, and the longer rows
(prompts prefilled beside them, `engine.fused_prefill`) with theirs. A 60-token prompt in the batch
then costs the other rows no padded queries and no keys past their own new slots.

How it hooks into an HF model, with no model code of ours: its attention implementation becomes
`dspark_packed` (sdpa, unpacking queries and packing outputs while a `Packing` is active, plain
sdpa otherwise), and the runner's cache is a `PackedDynamicCache`, whose `update` unpacks new keys
and values. A model whose attention exists only as its own eager function (gpt-oss: attention
sinks) attends with that function the same way (`dspark_packed_eager`). Models that could run sdpa
but were set to another implementation keep padded forwards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from dspark_ray.engine.absorbed_mla import absorbed_attention, absorbs

PACKED_ATTENTION = "dspark_packed"
PACKED_EAGER_ATTENTION = "dspark_packed_eager"
SHORT_ROW_QUERIES = 8  # rows with more new tokens than this (prompts) attend in a group of their own

Rows = slice | torch.Tensor  # a group's rows: a slice where they are contiguous (views, no copies)

# attention module class -> its model's own eager attention, for models that have no other
_EAGER_ATTENTION: dict[type, Callable] = {}


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded `[B, T]` batch sit: `flat_index[i]` is token i's index in
    the flattened padded batch, in row-major order. `groups`: the rows that attend together and the
    query count they attend with; None when all rows attend as one padded batch."""
    num_rows: int
    num_positions: int
    flat_index: torch.Tensor  # [N] int64
    groups: tuple[tuple[Rows, int], ...] | None = None

    @classmethod
    def of(cls, query_valid: torch.Tensor, device: torch.device) -> "Packing":
        """From the padded batch's `[B, T]` mask of real tokens."""
        num_rows, num_positions = query_valid.shape
        return cls(num_rows, num_positions, query_valid.reshape(-1).nonzero().squeeze(1).to(device),
                   attention_groups(query_valid.sum(1).tolist(), device))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """`[B, T, ...]` -> `[1, N, ...]`."""
        return padded.reshape(self.num_rows * self.num_positions, *padded.shape[2:])[self.flat_index][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`[1, N, ...]` -> `[B, T, ...]`, zeros at padding."""
        padded = packed.new_zeros(self.num_rows * self.num_positions, *packed.shape[2:])
        padded[self.flat_index] = packed[0]
        return padded.reshape(self.num_rows, self.num_positions, *packed.shape[2:])

    def unpack_heads(self, packed: torch.Tensor) -> torch.Tensor:
        """`[1, H, N, D]` -> `[B, H, T, D]` (the layout of attention inputs and cache updates)."""
        return self.unpack(packed.transpose(1, 2)).transpose(1, 2)


def attention_groups(num_queries: list[int], device: torch.device) -> tuple[tuple[Rows, int], ...] | None:
    """Short rows apart from long ones, each group with its longest row's query count; None when
    either kind is missing (one group, the padded batch as it is)."""
    short = [row for row, count in enumerate(num_queries) if count <= SHORT_ROW_QUERIES]
    long = [row for row, count in enumerate(num_queries) if count > SHORT_ROW_QUERIES]
    if not short or not long:
        return None
    return tuple((_rows(rows, device), max(num_queries[row] for row in rows)) for rows in (short, long))


def _rows(rows: list[int], device: torch.device) -> Rows:
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


_active: ContextVar[Packing | None] = ContextVar("dspark_packing", default=None)


class PackedDynamicCache(DynamicCache):
    """A `DynamicCache` whose updates arrive packed while a `Packing` is active."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        packing = _active.get()
        if packing is not None:
            key_states, value_states = packing.unpack_heads(key_states), packing.unpack_heads(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sdpa (or the model's own eager attention) over the padded layout: queries `[1, H, N, D]` in,
    outputs `[1, N, H, D]` out. An MLA module absorbing its `kv_b_proj` (`engine.absorbed_mla`)
    attends over its latents instead."""
    attend = absorbed_attention if absorbs(module) else _EAGER_ATTENTION.get(type(module), sdpa_attention_forward)
    packing = _active.get()
    if packing is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    query = packing.unpack_heads(query)
    if packing.groups is None:
        output, weights = attend(module, query, key, value, attention_mask, **kwargs)
        return packing.pack(output), weights
    return packing.pack(_attend_in_groups(attend, module, query, key, value, attention_mask, packing.groups,
                                          **kwargs)), None


def _attend_in_groups(attend, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor, groups: tuple[tuple[Rows, int], ...], **kwargs) -> torch.Tensor:
    """Each group's queries `[G, H, T_g, D]` over the keys up to its own last new slot (a row's new
    tokens fill the first of the T new slots); outputs `[B, T, H, D_v]`, zeros past each row's T_g."""
    num_new = query.shape[2]
    num_old = key.shape[2] - num_new
    output = None
    for rows, num_queries in groups:
        end = num_old + num_queries
        part, _ = attend(module, query[rows, :, :num_queries], key[rows, :, :end], value[rows, :, :end],
                         attention_mask[rows, :, :num_queries, :end], **kwargs)  # [G, T_g, H, D_v]
        if output is None:
            output = part.new_zeros(query.shape[0], num_new, *part.shape[2:])
        output[rows, :num_queries] = part
    return output


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
AttentionInterface.register(PACKED_EAGER_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_EAGER_ATTENTION, eager_mask)


def enable_packing(model: PreTrainedModel) -> bool:
    """Switch an sdpa model, or one with eager attention only, to packed attention (the same as
    before when no packing is active, and what absorbed MLA runs through); False, and the model
    unchanged, for any other attention implementation."""
    implementation = model.config._attn_implementation
    if implementation in (PACKED_ATTENTION, PACKED_EAGER_ATTENTION):
        return True
    if implementation == "sdpa":
        model.set_attn_implementation(PACKED_ATTENTION)
        return True
    if implementation == "eager" and not model._supports_sdpa:
        return _enable_eager_packing(model)
    return False


def _enable_eager_packing(model: PreTrainedModel) -> bool:
    """Its attention modules attend with the eager function of their own modeling file."""
    modeling = type(model).__module__
    eager = getattr(sys.modules[modeling], "eager_attention_forward", None)
    if eager is None:
        return False
    for module in model.modules():
        if type(module).__module__ == modeling and type(module).__name__.endswith("Attention"):
            _EAGER_ATTENTION[type(module)] = eager
    model.set_attn_implementation(PACKED_EAGER_ATTENTION)
    return True


@contextmanager
def packed(packing: Packing) -> Iterator[None]:
    """Forwards inside the block run packed (their inputs must be packed with `packing`)."""
    token = _active.set(packing)
    try:
        yield
    finally:
        _active.reset(token)
