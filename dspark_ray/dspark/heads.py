"""DSpark's cheap per-position heads: the sequential head and the confidence head.

Sequential head (DSpark section "semi-autoregressive drafting"): a prefix-dependent bias `B_k`
added to the backbone's base logits `U_k` before token k is sampled, so the draft distribution
is `softmax(U_k + B_k)`. `x_{k-1}` is the previous token of the block (the anchor for k = 0).
  - `vanilla`: `B_k = up(down(E[x_{k-1}]))`, a low-rank Markov transition.
  - `gated`:   `B_k = up(sigmoid(gate(h_k)) * down(E[x_{k-1}]))`, the transition gated (per rank) by
               the backbone's hidden state h_k.
  - `rnn`:     `s_k = GRU(down(E[x_{k-1}]), s_{k-1})`, `B_k = up(s_k)`: a state over the whole
               drafted prefix.
Confidence head: `c_k = sigmoid(w . [h_k ; E[x_{k-1}]] + b)`, the probability that the target accepts
token k given the prefix was accepted; we return its logit so calibration can temperature-scale it.

`E` is the target's (frozen) token embedding, handed in by the caller. Both heads run one position
at a time while drafting (`step`) and all positions at once under teacher forcing (`teacher_forced`).
"""

from __future__ import annotations

import torch
from torch import nn


class SequentialHead(nn.Module):
    """The `vanilla`, `gated` and `rnn` variants (`none` is simply no head)."""

    def __init__(self, kind: str, embed_size: int, hidden_size: int, rank: int, vocab_size: int) -> None:
        super().__init__()
        if kind not in ("vanilla", "gated", "rnn"):
            raise ValueError(f"unknown sequential head {kind!r}")
        self.kind = kind
        self.rank = rank
        self.down = nn.Linear(embed_size, rank, bias=False)
        self.up = nn.Linear(rank, vocab_size, bias=False)
        self.gate = nn.Linear(hidden_size, rank) if kind == "gated" else None
        self.cell = nn.GRUCell(rank, rank) if kind == "rnn" else None

    def initial_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor | None:
        return like.new_zeros(batch_size, self.rank) if self.kind == "rnn" else None

    def step(
        self,
        prev_embedding: torch.Tensor,  # [B, E] embedding of x_{k-1}
        hidden: torch.Tensor,  # [B, D] backbone state h_k
        state: torch.Tensor | None,  # [B, R] for 'rnn', else None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # bias [B, V], next state
        code = self.down(prev_embedding)  # [B, R]
        if self.kind == "gated":
            code = torch.sigmoid(self.gate(hidden)) * code
        elif self.kind == "rnn":
            state = self.cell(code, state)
            code = state
        return self.up(code), state

    def teacher_forced(
        self,
        prev_embeddings: torch.Tensor,  # [N, K, E] embeddings of x_{k-1} = the data's tokens
        hidden: torch.Tensor,  # [N, K, D]
    ) -> torch.Tensor:  # [N, K, V]
        if self.kind != "rnn":
            return self.step(prev_embeddings, hidden, None)[0]
        state = self.initial_state(prev_embeddings.shape[0], prev_embeddings)
        codes = []
        for k in range(prev_embeddings.shape[1]):
            state = self.cell(self.down(prev_embeddings[:, k]), state)
            codes.append(state)
        return self.up(torch.stack(codes, dim=1))


class ConfidenceHead(nn.Module):
    def __init__(self, hidden_size: int, embed_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size + embed_size, 1)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        """hidden `[..., D]`, prev_embedding `[..., E]` -> confidence logits `[...]`."""
        return self.proj(torch.cat([hidden, prev_embedding], dim=-1))[..., 0]
