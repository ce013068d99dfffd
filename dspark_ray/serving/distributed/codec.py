"""Draft distributions that are small on the wire AND exact: the grid codec.

A draft distribution is rounded to at most `max_support` tokens whose probabilities are integer
multiples of 1/GRID (largest-remainder rounding, so they sum to exactly 1). Such values are exact
in float32, so the dense reconstruction is bit-identical wherever it is built, and encoding a
reconstruction gives back the same counts. The drafter samples its tokens from the rounded
distribution (`quantize`), the draft worker sends `encode` of it, and the target rebuilds it with
`decode`: verification then uses exactly the distribution the drafts were sampled from, which is
all the speculative sampling rule needs to be lossless (any draft distribution works).

Cost per drafted token of a sampled sequence: 6 bytes per kept token (int32 id, uint16 count);
greedy drafts send no probabilities at all. Pure torch: no gRPC, no protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GRID = 1 << 16  # probabilities are k / GRID, k in 1..GRID; stored as k - 1 in a uint16


@dataclass(frozen=True)
class SparseProbs:
    """One distribution's support and its probabilities (counts / GRID, or exact float32 values)."""

    token_ids: Tensor  # [N] int32, ascending
    counts: Tensor | None  # [N] int32 in 1..GRID, or None when `probs` holds the values
    probs: Tensor | None = None  # [N] float32: a distribution that is not on the grid


def quantize(probs: Tensor, max_support: int) -> Tensor:  # [..., V] float32 -> [..., V] float32
    """Round each distribution to <= max_support tokens with probabilities on the 1/GRID grid."""
    shape, vocab_size = probs.shape, probs.shape[-1]
    flat = probs.reshape(-1, vocab_size).double()  # [R, V]
    top = flat.topk(min(max_support, vocab_size), dim=-1)  # [R, N]
    scaled = top.values / top.values.sum(-1, keepdim=True) * GRID  # [R, N], sums to GRID
    counts = scaled.floor()
    missing = (GRID - counts.sum(-1)).clamp(min=0).long()  # [R] < N: units still to hand out
    order = (scaled - counts).argsort(dim=-1, descending=True, stable=True)  # largest remainders first
    positions = torch.arange(order.shape[-1], device=probs.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    counts = counts.long() + (rank < missing[:, None]).long()  # [R, N]
    dense = torch.zeros(flat.shape, dtype=torch.float32, device=probs.device)
    dense.scatter_(-1, top.indices, counts.float() / GRID)
    return dense.reshape(shape)


def encode(probs: Tensor) -> SparseProbs:  # [V] float32
    """The support of one distribution; counts when it lies on the grid, exact float32 otherwise."""
    probs = probs.cpu()
    token_ids = probs.nonzero().squeeze(1)  # [N] ascending
    values = probs[token_ids].float()  # [N]
    counts = (values.double() * GRID).round()
    if bool((counts / GRID == values.double()).all()) and bool((counts >= 1).all()):
        return SparseProbs(token_ids.int(), counts.int())
    return SparseProbs(token_ids.int(), None, values)


def decode(sparse: SparseProbs, vocab_size: int) -> Tensor:  # [V] float32
    values = sparse.probs if sparse.counts is None else sparse.counts.float() / GRID  # exact division
    return torch.zeros(vocab_size).index_put_((sparse.token_ids.long(),), values.float())
