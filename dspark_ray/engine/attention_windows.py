"""Which cached keys each attention layer type sees, by token position: all earlier ones (full
attention), the last `size` including the query itself (a sliding window: gpt-oss, Gemma, Mistral),
or those of the query's own chunk of `size` positions (chunked attention: Llama 4).

The engine keeps every layer's keys for every cached token, full length, and applies a layer's
window as a mask in token positions (`BatchKVCache` builds one mask per layer type). Rolling back
rejected drafts then stays what it is for full attention, a mask update: no ring buffer to rewind,
and keys that slid out of the window before the rejected drafts came in are still there. The cost
is memory and attention over out-of-window slots, linear in the context rather than in the window.
The windows are the ones HF's own mask functions apply (`masking_utils.sliding_window_overlay`,
`chunked_overlay`).

This module knows the model config and positions only: not slots, drafts or the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Layer types whose state is not per-token keys and values, so a window mask cannot roll them back:
# what each one needs is named in the refusal.
UNSUPPORTED_LAYER_TYPES = {
    "linear_attention": "linear-attention layers (recurrent DeltaNet/SSM state) are not supported yet",
    "conv": "convolution layers (recurrent conv state) are not supported yet",
    "hybrid": "hybrid linear-attention layers (recurrent state) are not supported yet",
    "hybrid_sliding": "hybrid linear-attention layers (recurrent state) are not supported yet",
    "indexed_attention": "indexed sparse-attention layers (indexer keys) are not supported yet",
    "compressed_sparse_attention": "compressed attention layers (compressor state) are not supported yet",
    "heavily_compressed_attention": "compressed attention layers (compressor state) are not supported yet",
}


class UnsupportedAttention(ValueError):
    """The model has a layer type whose cache the engine cannot roll back."""


@dataclass(frozen=True)
class AttentionWindow:
    kind: Literal["full", "sliding", "chunked"]
    size: int = 0

    def restrict(self, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor | None
                 ) -> torch.Tensor:
        """`allowed` [B, T, K] (causal, valid keys) narrowed to this window, given the token
        positions of the queries [B, T] and of the keys [B, K] (not needed by a full window)."""
        if self.kind == "full":
            return allowed
        queries, keys = query_positions[:, :, None], key_positions[:, None, :]  # [B, T, 1], [B, 1, K]
        if self.kind == "sliding":
            return allowed & (keys > queries - self.size)
        return allowed & (keys.div(self.size, rounding_mode="floor") == queries.div(self.size, rounding_mode="floor"))


FULL = AttentionWindow("full")


@dataclass(frozen=True)
class AttentionWindows:
    """The windows of a model's layers. `by_layer_type` maps each of its layer types to its window
    (the model takes one mask per layer type, as HF's hybrid models do); None when every layer
    attends alike with `uniform` (the model takes one mask)."""
    uniform: AttentionWindow = FULL
    by_layer_type: dict[str, AttentionWindow] | None = None

    @property
    def all_full(self) -> bool:
        return self.by_layer_type is None and self.uniform == FULL

    @classmethod
    def of(cls, config: PretrainedConfig) -> "AttentionWindows":
        """From an HF config; raises `UnsupportedAttention` for layers the engine cannot roll back."""
        config = config.get_text_config(decoder=True)
        layer_types = list(getattr(config, "layer_types", None) or [])
        for layer_type in layer_types:
            if layer_type in UNSUPPORTED_LAYER_TYPES:
                raise UnsupportedAttention(UNSUPPORTED_LAYER_TYPES[layer_type])
        windows = {layer_type: _window(config, layer_type) for layer_type in layer_types}
        if any(window != FULL for window in windows.values()):
            return cls(by_layer_type=windows)
        window = getattr(config, "sliding_window", None)
        if window and not layer_types and getattr(config, "use_sliding_window", True):
            return cls(uniform=AttentionWindow("sliding", int(window)))  # Mistral, Mixtral: one window
        return cls()


def _window(config: PretrainedConfig, layer_type: str) -> AttentionWindow:
    if layer_type == "full_attention":
        return FULL
    if layer_type == "sliding_attention":
        return AttentionWindow("sliding", int(config.sliding_window))
    if layer_type == "chunked_attention":
        return AttentionWindow("chunked", int(config.attention_chunk_size))
    raise UnsupportedAttention(f"{layer_type!r} layers are not supported yet")


def full_length(cache: DynamicCache) -> DynamicCache:
    """`cache` with each sliding-window layer replaced by a full-length one: the window is the
    mask's job here, and a layer that drops keys past the window could not be rolled back."""
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache
