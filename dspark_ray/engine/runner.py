"""Runs one HF causal LM over a batch of sequences and keeps their KV caches.

The runner knows sequence ids and token ids only: no drafts, no sampling, no stop rules. Its
contract with callers: the cache of a sequence always holds a prefix of that sequence's tokens,
and `sync` rolls it back to the longest prefix that is still true.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from dspark_ray.engine.absorbed_mla import absorbing, install as install_absorption
from dspark_ray.engine.attention_windows import AttentionWindows, full_length
from dspark_ray.engine.feature_capture import LayerCapture
from dspark_ray.engine.kv_cache import BatchKVCache
from dspark_ray.engine.loading import context_limit
from dspark_ray.engine.packed_forward import Packing, PackedDynamicCache, enable_packing, packed
from dspark_ray.engine.position_temperature import PositionTemperature


# The longest prompt a forward beside running rows prefills (`engine.fused_prefill`); longer ones get
# a forward of their own. Padded, a prompt of T tokens pads every row of the forward to T queries,
# so only short prompts pay fused; packed, a prompt attends in a group of its own
# (engine.packed_forward), so longer ones pay too, until an MLA forward would leave absorbed
# attention and the saved forward is small next to the prompt's own cost, hence the caps
# (docs/design/reasons.md has the timings behind them).
FUSED_PROMPT_TOKENS_PADDED = 16
FUSED_PROMPT_TOKENS_PACKED = 64


class CausalLMRunner:
    def __init__(self, model: PreTrainedModel, pad_token_id: int = 0,
                 capture_layers: list[int] | None = None, packed_forwards: bool = True,
                 absorbed_mla: bool = True) -> None:
        self.model = model
        self.capture = LayerCapture(model, capture_layers) if capture_layers else None
        self.last_features: torch.Tensor | None = None  # [N, T, L*H] of the last forward, if capturing
        self.pad_token_id = pad_token_id
        self.max_position = context_limit(model)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.cache_keyword = cache_keyword(model)
        self.windows = AttentionWindows.of(model.config)
        self.temperature = PositionTemperature(model)
        engine_attention = (packed_forwards or absorbed_mla) and enable_packing(model)
        self.packs = packed_forwards and engine_attention  # ragged forwards run packed (engine.packed_forward)
        # MLA attends over the cached latents in forwards of up to this many new tokens a row
        # (engine.absorbed_mla); 0: never
        self.absorb_up_to = install_absorption(model) if absorbed_mla and engine_attention else 0
        self.seq_ids: list[int] = []
        self.cache = self._new_cache(0)

    @property
    def fused_prompt_limit(self) -> int:
        """The longest prompt to prefill beside other rows. An MLA target's forwards attend absorbed
        only up to `absorb_up_to` new tokens a row; a longer prompt would switch the running rows'
        attention to the expanded form, so it stays apart."""
        if not self.packs:
            return FUSED_PROMPT_TOKENS_PADDED
        if self.absorb_up_to:
            return min(FUSED_PROMPT_TOKENS_PACKED, self.absorb_up_to)
        return FUSED_PROMPT_TOKENS_PACKED

    def _new_cache(self, num_rows: int) -> BatchKVCache:
        return BatchKVCache(full_length(PackedDynamicCache(config=self.model.config)), num_rows, self.windows)

    def add(self, token_lists: Mapping[int, list[int]]) -> torch.Tensor:
        """Prefill new sequences; returns logits after each one's last token. # [N, V]"""
        new_ids = list(token_lists)
        self._check_new(new_ids)
        prefill = self._new_cache(len(new_ids))
        lists = [token_lists[seq_id] for seq_id in new_ids]
        logits = self._forward(prefill, lists)  # [N, T, V]
        last = torch.tensor([len(tokens) - 1 for tokens in lists])
        self.cache.merge(prefill)
        self.seq_ids.extend(new_ids)
        return logits[torch.arange(len(new_ids)), last]

    def join(self, seq_ids: list[int]) -> None:
        """Give new sequences empty caches: the next `forward` that feeds them their prompts
        prefills them in the same forward as the other rows' tokens."""
        self._check_new(seq_ids)
        self.cache.extend(len(seq_ids))
        self.seq_ids.extend(seq_ids)

    def _check_new(self, seq_ids: list[int]) -> None:
        if any(seq_id in self.seq_ids for seq_id in seq_ids):
            raise ValueError("sequence already present in the runner")

    def remove(self, seq_ids: list[int]) -> None:
        gone = set(seq_ids)
        keep = [row for row, seq_id in enumerate(self.seq_ids) if seq_id not in gone]
        if len(keep) == len(self.seq_ids):
            return
        self.cache.select(keep)
        self.seq_ids = [self.seq_ids[row] for row in keep]
        if not self.seq_ids:
            self.cache = self._new_cache(0)

    def forward(self, token_lists: Mapping[int, list[int]]) -> torch.Tensor:
        """Append tokens to the named sequences; logits (and `last_features`) in the order of
        `token_lists`. # [N, T, V]

        The other sequences get nothing and cost no compute: the forward runs over the named rows
        alone (`BatchKVCache.narrowed`), so a pipelined micro-batch costs only its own rows.
        Narrowing copies the named rows' KV out and back; for the draft LM's one-token forwards
        that is about what it saves (docs/design/reasons.md)."""
        rows = [self.seq_ids.index(seq_id) for seq_id in token_lists]
        if len(rows) < len(self.seq_ids):
            with self.cache.narrowed(rows) as part:
                return self._forward(part, list(token_lists.values()))
        logits = self._forward(self.cache, [token_lists[seq_id] for seq_id in self.seq_ids])
        if rows == list(range(len(self.seq_ids))):
            return logits
        index = torch.tensor(rows)
        if self.last_features is not None:
            self.last_features = self.last_features[index]
        return logits[index]

    def cached_tokens(self, seq_id: int) -> list[int]:
        return self.cache.cached_tokens[self.seq_ids.index(seq_id)]

    def uncached_suffix(self, seq_id: int, tokens: list[int]) -> list[int]:
        """The tokens that must be fed to bring the cache to `tokens` (after `sync`)."""
        return tokens[len(self.cached_tokens(seq_id)):]

    def sync(self, committed: Mapping[int, list[int]]) -> None:
        """Roll each named cache back to its longest prefix agreeing with `committed`, keeping the
        last committed token uncached so the next forward yields logits after it."""
        for row, seq_id in enumerate(self.seq_ids):
            if seq_id not in committed:
                continue
            tokens, cached = committed[seq_id], self.cache.cached_tokens[row]
            keep = _common_prefix_length(cached, tokens)
            self.cache.truncate(row, min(keep, len(tokens) - 1))
        if self.cache.needs_compaction():
            self.cache.compact()

    @torch.no_grad()
    def _forward(self, cache: BatchKVCache, token_lists: list[list[int]]) -> torch.Tensor:
        inputs = cache.prepare(token_lists, self.pad_token_id, self.dtype, self.max_position)
        packing = self._packing(inputs.query_valid)
        input_ids, position_ids = inputs.input_ids.to(self.device), inputs.position_ids.to(self.device)
        if packing is not None:
            input_ids, position_ids = packing.pack(input_ids), packing.pack(position_ids)
        with cache.undone_on_error(), \
                self.capture.recording() if self.capture is not None else nullcontext(), \
                packed(packing) if packing is not None else nullcontext(), \
                self.temperature.by_position_ids(position_ids), \
                absorbing() if inputs.input_ids.shape[1] <= self.absorb_up_to else nullcontext():
            output = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=_to_device(inputs.attention_mask, self.device),
                use_cache=True,
                **{self.cache_keyword: cache.hf_cache},
            )
        cache.commit(token_lists, inputs)
        logits = output.logits.float()
        if self.capture is not None:
            self.last_features = self.capture.take()
        if packing is not None:
            logits = packing.unpack(logits)
            if self.capture is not None:
                self.last_features = packing.unpack(self.last_features)
        return logits

    def _packing(self, query_valid: torch.Tensor) -> Packing | None:
        """Pack a ragged forward; one without padding (or without any token: a forward that only
        reads the logits after a pad) runs as it is."""
        if not self.packs or bool(query_valid.all()) or not bool(query_valid.any()):
            return None
        return Packing.of(query_valid, self.device)


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache`, or `past_key_values` before transformers
    renamed it during 5.x (5.17 still takes the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _to_device(mask: torch.Tensor | dict[str, torch.Tensor], device: torch.device
               ) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(mask, dict):
        return {layer_type: layer_mask.to(device) for layer_type, layer_mask in mask.items()}
    return mask.to(device)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    return next(i for i in range(limit) if a[i] != b[i])
