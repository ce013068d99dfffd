"""Absorbed MLA: DeepSeek-V2/V3 attention over the cached latents, without expanding them.

HF's MLA attention caches each token's compressed latent `c` (`kv_lora_rank` values after
`kv_a_layernorm`) and its shared rotary key `k_rot`, then at EVERY forward expands the whole
cache through `kv_b_proj` into per-head keys and values: a `[slots, kv_lora_rank] x [kv_lora_rank,
heads * (qk_nope_head_dim + v_head_dim)]` product per layer and step, growing with every cached
slot (docs/design/reasons.md; for DeepSeek-V3 itself, 128 heads over a 512-wide latent, it
dwarfs the rest of a decode step at long contexts). The DeepSeek-V2 paper's absorption trick, which vLLM's and SGLang's MLA
backends use, moves `kv_b_proj` to the other side of the attention instead. With `W_UK[h]`
`[qk_nope, rank]` and `W_UV[h]` `[v_head, rank]` the two halves of head h's rows of `kv_b_proj`:

    q_nope . (W_UK[h] c)  =  (W_UK[h]^T q_nope) . c          scores on the latent
    sum_s a_s (W_UV[h] c_s)  =  W_UV[h] (sum_s a_s c_s)      values on the latent

so attention runs once, as multi-query attention over the cached `[c ; k_rot]`, and only the
queries (T per row) and outputs are projected: the per-slot cost falls from
`rank * heads * (qk_nope + v_head)` to `heads * (2 * rank + qk_rope)` multiply-adds.

The attention computed is the same; its rounding is not (sums run in another order). Greedy
identity holds between the engine's own paths, which all attend this way (a verification of T
tokens against T decode steps, drafts or none); against HF's expanded form the tokens agree up to
fp32 near-ties (README, "Lossless").

How it hooks in, with no model code of ours: `install` wraps each MLA module's `expand_kv` so
that, inside an `absorbing()` block, it hands the latents through unexpanded; the engine's
attention implementation (`engine.packed_forward`) then calls `absorbed_attention` for such
modules. Outside the block (HF `generate`, DeepSpec's target pass) the model is HF's, unchanged. The
runner opens the block only for a model that runs the engine's attention implementation.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch.nn import functional as F

_INSTALLED = "_dspark_absorbed_mla"  # marks a module whose expand_kv can hand latents through
_absorbing: ContextVar[bool] = ContextVar("dspark_absorbing", default=False)


def install(model: torch.nn.Module) -> int:
    """Make every MLA attention module of `model` absorbable. Returns the most new tokens per row
    for which absorbed attention is the cheaper (`crossover_queries`; the fewest over the modules),
    0 if the model has no MLA (then nothing changes)."""
    most_queries = None
    for module in model.modules():
        if not getattr(module, _INSTALLED, False):
            if not _is_mla(module):
                continue
            module.expand_kv = types.MethodType(_latents_while_absorbing(module.expand_kv), module)
            setattr(module, _INSTALLED, True)
        queries = crossover_queries(module.kv_lora_rank, module.qk_nope_head_dim, module.v_head_dim)
        most_queries = queries if most_queries is None else min(most_queries, queries)
    return most_queries or 0


def crossover_queries(rank: int, qk_nope_head_dim: int, v_head_dim: int) -> int:
    """Per head, query and cached slot, expanded attention spends `qk_nope + qk_rope + v_head`
    multiply-adds on scores and values plus `rank * (qk_nope + v_head) / T` expanding the slot
    (shared by a row's T new tokens); absorbed attention spends `2 * rank + qk_rope`. Absorbing
    pays while `T * (2 * rank - qk_nope - v_head) < rank * (qk_nope + v_head)`: decode and
    verification steps (T = 1 + drafts), not long prefills, as vLLM runs MLA absorbed for decode
    only (bundled target: up to 63 tokens a row; DeepSeek-V3: 170)."""
    spare = 2 * rank - qk_nope_head_dim - v_head_dim
    expansion = rank * (qk_nope_head_dim + v_head_dim)
    return 1 << 30 if spare <= 0 else max(1, (expansion - 1) // spare)


@contextmanager
def absorbing() -> Iterator[None]:
    """Forwards inside the block attend absorbed, over the latents (the model must run the
    engine's attention implementation)."""
    token = _absorbing.set(True)
    try:
        yield
    finally:
        _absorbing.reset(token)


def absorbs(module: torch.nn.Module) -> bool:
    """Whether `module`'s attention runs absorbed right now."""
    return _absorbing.get() and getattr(module, _INSTALLED, False)


def _latents_while_absorbing(expand_kv):
    def expand_or_hand_through(module, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        # kv_nope [B, 1, S, rank], k_rot [B, 1, S, rope] -> one-head keys [c ; k_rot] and values c
        if not _absorbing.get():
            return expand_kv(kv_nope, k_rot)
        return torch.cat([kv_nope, k_rot], dim=-1), kv_nope
    return expand_or_hand_through


def absorbed_attention(module: torch.nn.Module, query: torch.Tensor, latent_keys: torch.Tensor,
                       latents: torch.Tensor, attention_mask: torch.Tensor | None,
                       scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of `query` `[B, H, T, qk_nope + qk_rope]` over `latent_keys` `[B, 1, S, rank + qk_rope]`
    (`[c ; k_rot]`) and `latents` `[B, 1, S, rank]`; returns `[B, T, H, v_head]`, as sdpa does."""
    batch, num_heads, num_queries, _ = query.shape
    rank = latents.shape[-1]
    weight = module.kv_b_proj.weight.view(num_heads, -1, rank)  # [H, qk_nope + v_head, rank]
    key_weight, value_weight = weight[:, :module.qk_nope_head_dim], weight[:, module.qk_nope_head_dim:]
    q_nope, q_rot = query.split([module.qk_nope_head_dim, query.shape[-1] - module.qk_nope_head_dim], dim=-1)
    absorbed_query = torch.cat([q_nope @ key_weight, q_rot], dim=-1)  # [B, H, T, rank + rope]
    # One key/value head for all H query heads: fold the heads into the query axis (h-major),
    # so sdpa sees one head of H * T queries and no copy of the cache is made per head.
    folded = absorbed_query.reshape(batch, 1, num_heads * num_queries, -1)
    mask = _folded_mask(attention_mask, num_heads, num_queries, latents.shape[2], query.device)
    latent_output = F.scaled_dot_product_attention(
        folded, latent_keys, latents, attn_mask=mask, scale=scaling if scaling is not None else module.scaling)
    latent_output = latent_output.view(batch, num_heads, num_queries, rank)
    output = latent_output @ value_weight.transpose(1, 2)  # [B, H, T, v_head]
    return output.transpose(1, 2).contiguous(), None


def _folded_mask(attention_mask: torch.Tensor | None, num_heads: int, num_queries: int, num_keys: int,
                 device: torch.device) -> torch.Tensor | None:
    """The `[B, 1, T, S]` mask tiled over the folded heads: `[B, 1, H * T, S]`. Without a mask,
    queries are the last T of S positions and attend causally (HF passes none when that holds)."""
    if attention_mask is None:
        if num_queries == 1:
            return None
        key_index = torch.arange(num_keys, device=device)
        query_index = torch.arange(num_keys - num_queries, num_keys, device=device)
        attention_mask = (key_index[None, :] <= query_index[:, None])[None, None]  # [1, 1, T, S]
    attention_mask = attention_mask[..., :num_keys]
    return attention_mask.repeat(1, 1, num_heads, 1)


def _is_mla(module: torch.nn.Module) -> bool:
    """HF's MLA attention with all its heads here, in plain tensors (a rank of a tensor-parallel
    group whose plan shards attention holds a slice of `kv_b_proj`, or a DTensor, and stays expanded)."""
    projection = getattr(module, "kv_b_proj", None)
    if not (callable(getattr(module, "expand_kv", None)) and isinstance(projection, torch.nn.Linear)
            and projection.bias is None and hasattr(module, "scaling")
            and type(projection.weight.data) is torch.Tensor):
        return False
    head_dims = getattr(module, "qk_nope_head_dim", 0) + getattr(module, "v_head_dim", 0)
    return tuple(projection.weight.shape) == (module.num_heads * head_dims, module.kv_lora_rank)
