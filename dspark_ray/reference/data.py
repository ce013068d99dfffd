"""Token streams and fixed-length training windows built from the corpus.

Each file is tokenized without special tokens and followed by `<|endoftext|>`; files are
concatenated in sorted order and cut into windows of `seq_len + 1` tokens (inputs and shifted
labels). The window order is shuffled by a seeded generator, so data order depends on the seed.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dspark_ray.reference import corpus


def token_stream(tokenizer: PreTrainedTokenizerBase, split: str) -> torch.Tensor:
    """All files of `split` as one int64 tensor `[N]`, documents separated by eos."""
    ids: list[int] = []
    for _, text in corpus.iter_texts(split):
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows `[num_windows, seq_len + 1]` (the tail is dropped)."""
    num_windows = (stream.numel() - 1) // seq_len
    starts = torch.arange(num_windows) * seq_len
    offsets = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offsets[None, :]]


class WindowSampler:
    """Yields batches `[batch_size, seq_len + 1]`, reshuffling the windows each epoch."""

    def __init__(self, all_windows: torch.Tensor, batch_size: int, seed: int):
        self.windows = all_windows
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def next_batch(self) -> torch.Tensor:
        if self._cursor + self.batch_size > self._order.numel():
            self._order = torch.randperm(self.windows.shape[0], generator=self.generator)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return self.windows[index]


def heldout_windows(
    tokenizer: PreTrainedTokenizerBase, seq_len: int, num_tokens: int
) -> torch.Tensor:
    """The first `num_tokens` held-out tokens (rounded down to windows) as `[W, seq_len + 1]`."""
    all_windows = windows(token_stream(tokenizer, "heldout"), seq_len)
    return all_windows[: max(1, num_tokens // seq_len)]
