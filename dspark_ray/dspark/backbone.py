"""The parallel backbone's layers (DFlash style): block positions attend to the target's context.

Each layer projects the fused target context features into keys and values with the SAME k/v
projections as the block tokens (DFlash's "KV injection"), so the context K/V of a token is
computed once, cached by the caller, and reused for every later block. Block positions attend to
the context (a mask says which slots are real) and bidirectionally to each other.

This module knows nothing about vocabularies, heads, caches or sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions `[...]` -> two `[..., head_dim]` tensors."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [..., head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[..., T, H, D]`, cos/sin `[..., T, D]` (rotate-half convention); the result has x's dtype
    (the float32 tables would otherwise promote a bfloat16 drafter's states to float32)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[..., None, :] + rotated * sin[..., None, :]).to(x.dtype)


class BackboneLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, rope_theta: float,
                 eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.rope_theta = rope_theta
        self.input_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.post_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))  # [..., T, H, Dh]

    def keys_values(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of already-normalised inputs. hidden `[..., T, D]` -> 2 x `[..., T, D]`."""
        keys = self.k_norm(self._split(self.k_proj(hidden)))  # [..., T, H, Dh]
        keys = apply_rope(keys, *rope_cos_sin(positions, self.head_dim, self.rope_theta))
        return keys.flatten(-2), self.v_proj(hidden)

    def context_keys_values(self, context: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """context `[..., S, D]` (fused target features) -> `[..., S, 2, D]` (keys, values) for the cache."""
        keys, values = self.keys_values(context, positions)
        return torch.stack([keys, values], dim=-2)

    def forward(
        self,
        x: torch.Tensor,  # [B, Q, D] block positions
        positions: torch.Tensor,  # [B, Q] int64
        context_kv: torch.Tensor,  # [B, S, 2, D] this layer's cached context keys and values
        mask: torch.Tensor,  # [B, Q, S + Q] bool: True where a query may attend
    ) -> torch.Tensor:  # [B, Q, D]
        h = self.input_norm(x)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        queries = apply_rope(self.q_norm(self._split(self.q_proj(h))), cos, sin)  # [B, Q, H, Dh]
        block_keys, block_values = self.keys_values(h, positions)  # [B, Q, D] each
        keys = torch.cat([context_kv[:, :, 0], block_keys], dim=1)  # [B, S + Q, D]
        values = torch.cat([context_kv[:, :, 1], block_values], dim=1)
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2), self._split(keys).transpose(1, 2), self._split(values).transpose(1, 2),
            attn_mask=mask[:, None],
        )  # [B, H, Q, Dh]
        x = x + self.o_proj(attended.transpose(1, 2).flatten(-2))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
