"""Training batches: regenerated sequences and random anchor positions in them.

A training sample is a block: an anchor position `a` (its token plays the last committed token),
the context before it, and the next `block_size` tokens as labels. Anchors are drawn uniformly,
without replacement, from the answer part of each sequence (or everywhere with
`answer_only=False`). All randomness comes from one `torch.Generator`, whose state is saved in
checkpoints, so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dspark_ray.deepspec.records import Record


@dataclass(frozen=True, eq=False)
class SequenceBatch:
    record_ids: list[str]
    input_ids: torch.Tensor  # [B, T] int64, right-padded with 0
    lengths: torch.Tensor  # [B] int64
    answer_starts: torch.Tensor  # [B] int64: index of the first answer token

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return replace(self, input_ids=self.input_ids.to(device), lengths=self.lengths.to(device),
                       answer_starts=self.answer_starts.to(device))


@dataclass(frozen=True, eq=False)
class BlockBatch:
    anchors: torch.Tensor  # [B, A] int64 positions (0 where unused)
    anchor_valid: torch.Tensor  # [B, A] bool
    positions: torch.Tensor  # [B, A, K] a + k (clamped): where the target's logits score label k
    labels: torch.Tensor  # [B, A, K] t[a + k + 1]
    prev_ids: torch.Tensor  # [B, A, K] t[a + k]: x_{k-1} of the sequential head (anchor first)
    valid: torch.Tensor  # [B, A, K] bool, a contiguous prefix per block

    def to(self, device: torch.device | str) -> "BlockBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class SequenceSampler:
    """Batches of whole records (cut to max_len), in a reshuffled order each epoch."""

    def __init__(self, records: list[Record], batch_size: int, max_len: int, generator: torch.Generator) -> None:
        self.records = [record for record in records if len(record.token_ids) >= 3]
        if not self.records:
            raise ValueError("no usable training records (each needs at least 3 tokens)")
        self.batch_size, self.max_len, self.generator = batch_size, max_len, generator
        self._order: list[int] = []

    def state(self) -> list[int]:
        return list(self._order)

    def load_state(self, order: list[int]) -> None:
        self._order = list(order)

    def next_batch(self) -> SequenceBatch:
        if len(self._order) < self.batch_size:
            self._order += torch.randperm(len(self.records), generator=self.generator).tolist()
        chosen = [self.records[i] for i in self._order[: self.batch_size]]
        del self._order[: self.batch_size]
        tokens = [record.token_ids[: self.max_len] for record in chosen]
        lengths = torch.tensor([len(t) for t in tokens])
        input_ids = torch.zeros(len(tokens), int(lengths.max()), dtype=torch.long)
        for row, row_tokens in enumerate(tokens):
            input_ids[row, : len(row_tokens)] = torch.tensor(row_tokens)
        starts = torch.tensor([len(record.prompt_token_ids) for record in chosen])
        return SequenceBatch([record.id for record in chosen], input_ids, lengths, starts)


def sample_blocks(batch: SequenceBatch, num_anchors: int, block_size: int, generator: torch.Generator,
                  answer_only: bool = True) -> BlockBatch:
    rows, width = batch.input_ids.shape
    anchors = torch.zeros(rows, num_anchors, dtype=torch.long)
    anchor_valid = torch.zeros(rows, num_anchors, dtype=torch.bool)
    for row in range(rows):
        low = max(0, int(batch.answer_starts[row]) - 1) if answer_only else 0
        high = int(batch.lengths[row]) - 1  # an anchor needs at least one label after it
        if high <= low:
            continue
        chosen = low + torch.randperm(high - low, generator=generator)[:num_anchors]
        anchors[row, : len(chosen)] = chosen.sort().values
        anchor_valid[row, : len(chosen)] = True
    offsets = torch.arange(block_size)
    positions = anchors[:, :, None] + offsets  # [B, A, K]
    in_sequence = (positions + 1 < batch.lengths[:, None, None]) & anchor_valid[:, :, None]
    valid = in_sequence.long().cumprod(dim=-1).bool()
    positions = positions.clamp(max=width - 1)
    gather = lambda index: batch.input_ids.gather(1, index.flatten(1)).view_as(index)  # noqa: E731
    labels = gather((positions + 1).clamp(max=width - 1))
    return BlockBatch(anchors, anchor_valid, positions, labels, gather(positions), valid)
