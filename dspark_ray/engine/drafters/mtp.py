"""MTP drafting: the target's own next-token-prediction layer (DeepSeek-V3's MTP module), chained.

DeepSeek-V3 checkpoints ship `num_nextn_predict_layers` MTP modules after the decoder, stored as
decoder layer `num_hidden_layers` (61 in V3): `enorm`, `hnorm`, `eh_proj`, a decoder block and
`shared_head.norm` (embeddings and lm_head are the target's). transformers skips them when it loads
the target; `load_mtp` reads them with transformers' own `MtpModel` (its checkpoint renamings and
expert fusing), which builds the block from the target's config and shares its embeddings and
lm_head.

The MTP entry at position i takes the target's hidden state h_i (after the final norm, as
transformers' MTP generation, vLLM and SGLang feed it) and the embedding of token t_{i+1}:
`eh_proj(cat(enorm(emb), hnorm(h)))` through the block, `post_norm` (= `shared_head.norm`), then the
lm_head predicts t_{i+2}. The block attends over the MTP's own KV cache of earlier entries. With n
committed tokens the target has cached positions 0..n-2, so entry n-2 (h_{n-2}, the last committed
token) is the query whose logits give the first draft; draft j+1 comes from the entry at n-2+j fed
the MTP's own output hidden state and draft j (chained, one layer reused, k > 1).

Cache discipline: per sequence, entries 0..c-1 are cached (all from the target's states) and the
target states of positions c..n-2 wait (`PendingFeatures`, captured from the target's last decoder
layer: `capture_layer`) until the sequence next drafts. A proposal feeds the waiting positions, then
the chain, and rolls back to positions 0..n-3, keeping h_{n-2} waiting: the entry the next proposal
queries again, so chained entries (built from the MTP's own guesses) and rejected drafts never stay.

A sequence whose states are incomplete (the verifier captured none) gets no drafts: the target
alone decodes it. DeepSeek-V4 is refused: its MTP block (`mtp.*`) is a V4 decoder layer (hyper-
connection streams, compressed attention) that transformers' `MtpModel` does not build (5.25) and
whose caches this engine cannot roll back yet.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from dspark_ray.core.sampling import SamplingTensors
from dspark_ray.dspark.pending_features import PendingFeatures
from dspark_ray.dspark.target_parts_loader import checkpoint_files
from dspark_ray.engine.drafters.base import (DraftProbsTransform, DraftProposal, TargetFeatures, choose_drafts,
                                               propose_ready)
from dspark_ray.engine.kv_cache import BatchKVCache
from dspark_ray.engine.loading import ModelLoadError, context_limit
from dspark_ray.engine.sequence import Sequence


def capture_layer(target_config: PretrainedConfig) -> int:
    """The target layer whose output (before the final norm) the MTP drafter is fed."""
    return target_config.num_hidden_layers - 1


def load_mtp(target: PreTrainedModel, directory: Path | str) -> PreTrainedModel:
    """The target's first MTP module (`target`: a loaded target or `load_hollow_target`'s), read
    from the checkpoint in `directory`: the target's own, or one holding just its MTP tensors
    (`deepspec train-mtp`). Raises `ModelLoadError` if the checkpoint holds none."""
    try:
        from transformers.modeling_layers import MtpModel
    except ImportError as error:
        raise ModelLoadError("drafter 'mtp' needs transformers with MTP support (5.25 or newer)") from error
    directory, config = Path(directory), target.config
    if config.model_type == "deepseek_v4":
        raise ModelLoadError(
            f"{directory}: DeepSeek-V4's MTP layer (its mtp.* tensors) is a V4 decoder layer (hyper-connection "
            "streams, compressed attention) that transformers' MtpModel does not build and drafter 'mtp' "
            "does not run yet")
    first = config.num_hidden_layers
    prefix = f"model.layers.{first}."
    shipped = any(key.startswith(prefix) for key in checkpoint_files(directory))
    if not getattr(config, "num_mtp_layers", 0) or not shipped:
        # (transformers defaults num_nextn_predict_layers to 1: the checkpoint is what tells)
        raise ModelLoadError(
            f"{directory}: the target has no MTP layer (no {prefix}* tensors in its checkpoint); drafter 'mtp' "
            "needs a DeepSeek-V3-style checkpoint that ships its next-token-prediction layer")
    # MtpModel reads the checkpoint the target came from and finds the MTP tensors by the target
    # class's ignored-key patterns, which name V3's layer 61 only: point both at what is wanted on
    # this instance while loading.
    target._keys_to_ignore_on_load_unexpected = [*(type(target)._keys_to_ignore_on_load_unexpected or []),
                                                 rf"model\.layers\.{first}\."]
    source, target.config.name_or_path = target.config.name_or_path, str(directory)
    try:
        mtp = MtpModel.from_pretrained(target)
    finally:
        del target._keys_to_ignore_on_load_unexpected
        target.config.name_or_path = source
    mtp.rotary_emb = None  # the target's (on the meta device in a hollow target): MTPDrafter builds its own
    embeddings = target.get_input_embeddings().weight
    return mtp.to(device=embeddings.device, dtype=embeddings.dtype).eval()


class MTPDrafter:
    """Drafts up to `num_speculative_tokens` per sequence with the target's MTP layer, its KV cache a
    batch of per-sequence rows (`BatchKVCache`; the module docstring says what they hold)."""

    def __init__(self, mtp: PreTrainedModel, target: PreTrainedModel, num_speculative_tokens: int,
                 pad_token_id: int = 0, draft_probs_transform: DraftProbsTransform | None = None) -> None:
        """`mtp`: `load_mtp(target, ...)`; `target` lends its final norm and rotary settings (a hollow
        target will do)."""
        self.mtp = mtp
        self.final_norm = target.get_decoder().norm
        self.device = target.get_input_embeddings().weight.device
        self.rotary = type(target.get_decoder().rotary_emb)(config=target.config).to(self.device)
        self.dtype = target.get_input_embeddings().weight.dtype
        self.max_position = context_limit(target)
        self.max_draft_tokens = num_speculative_tokens
        self.pad_token_id = pad_token_id
        self.draft_probs_transform = draft_probs_transform
        self.vocab_size = target.get_output_embeddings().weight.shape[0]
        self.seq_ids: list[int] = []  # the rows of `cache`
        self.cache = self._new_cache(0)
        self.pending = PendingFeatures()  # target states of positions not yet in `cache`

    def _new_cache(self, num_rows: int) -> BatchKVCache:
        return BatchKVCache(DynamicCache(config=self.mtp.config), num_rows)

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        new = [seq for seq in seqs if seq.seq_id not in self.seq_ids]
        self.cache.extend(len(new))
        self.seq_ids.extend(seq.seq_id for seq in new)
        self._extend(seqs, target_features)

    def remove(self, seq_ids: list[int]) -> None:
        gone = set(seq_ids)
        for seq_id in gone:
            self.pending.remove(seq_id)
        keep = [row for row, seq_id in enumerate(self.seq_ids) if seq_id not in gone]
        if len(keep) == len(self.seq_ids):
            return
        self.seq_ids = [self.seq_ids[row] for row in keep]
        if keep:
            self.cache.select(keep)
        else:
            self.cache = self._new_cache(0)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        self._extend([seq for seq in seqs if seq.seq_id in self.seq_ids], target_features)

    def _extend(self, seqs: list[Sequence], target_features: TargetFeatures | None) -> None:
        """Keep the states of newly cached target positions, then cut to the target's cache:
        positions 0..n-2 of n committed tokens, the last of them waiting."""
        self.pending.append_captured(target_features, [seq.seq_id for seq in seqs])
        for seq in seqs:
            self._truncate(seq.seq_id, seq.num_tokens - 1)

    def _truncate(self, seq_id: int, num_positions: int) -> None:
        row = self.seq_ids.index(seq_id)
        cached = self._cached(row)
        if cached >= num_positions:  # only after an undone step: the query's state is gone, no more drafts
            self.cache.truncate(row, num_positions - 1)
            self.pending.remove(seq_id)
        else:
            self.pending.truncate(seq_id, num_positions - cached)

    def _cached(self, row: int) -> int:
        return len(self.cache.cached_tokens[row])

    def _ready(self, seq: Sequence) -> bool:
        if seq.seq_id not in self.seq_ids:
            return False
        waiting = self.pending.length(seq.seq_id)
        return waiting > 0 and self._cached(self.seq_ids.index(seq.seq_id)) + waiting == seq.num_tokens - 1

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:  # a few forwards of one layer: no time budget
        return propose_ready(seqs, max_draft_tokens, self.max_draft_tokens, self._ready, self._draft_and_roll_back)

    def _draft_and_roll_back(self, seqs: list[Sequence], budgets: list[int]) -> DraftProposal:
        proposal = self._draft(seqs, budgets)
        for seq in seqs:
            self._roll_back(seq)
        if self.cache.needs_compaction():
            self.cache.compact()
        return proposal

    def _draft(self, seqs: list[Sequence], budgets: list[int]) -> DraftProposal:
        cache_rows = [self.seq_ids.index(seq.seq_id) for seq in seqs]
        states = [self.pending.take(seq.seq_id) for seq in seqs]  # [p_b, H] before the final norm
        for seq, state in zip(seqs, states):  # the last one stays waiting (module docstring)
            self.pending.append(seq.seq_id, state[-1:])
        feeds = [seq.token_ids[self._cached(row) + 1:] for seq, row in zip(seqs, cache_rows)]  # t_{c+1}..t_{n-1}
        hidden = [self.final_norm(state.to(self.device, self.dtype)) for state in states]
        sampling = SamplingTensors.from_params([seq.request.sampling for seq in seqs])
        any_sampled = not bool(sampling.is_greedy.all())
        width = max(budgets)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        draft_probs = torch.zeros(len(seqs), width, self.vocab_size) if any_sampled else None
        with self._rows(cache_rows) as cache:
            last = self._forward(cache, feeds, hidden)  # [b, H]
            for k in range(width):
                logits = self.mtp.shared_head(last).float()  # [b, V]
                chosen, probs = choose_drafts(logits, sampling, seqs, budgets, k, self.draft_probs_transform)
                if probs is not None:
                    draft_probs[:, k] = probs.cpu()
                tokens[:, k] = chosen.cpu()
                if k + 1 < width:
                    last = self._forward(cache, [[token] for token in tokens[:, k].tolist()], list(last[:, None]))
        return DraftProposal(tokens, torch.tensor(budgets), draft_probs)

    def _roll_back(self, seq: Sequence) -> None:
        """Keep the entries of positions 0..n-3: the chain's go, and n-2 is queried again."""
        self.cache.truncate(self.seq_ids.index(seq.seq_id), seq.num_tokens - 2)

    def _rows(self, rows: list[int]):
        """The cache of `rows` alone for a proposal's forwards (`BatchKVCache.narrowed`), or the
        cache itself when they are all of them."""
        if rows == list(range(len(self.seq_ids))):
            return nullcontext(self.cache)
        if not any(getattr(layer, "is_initialized", False) for layer in self.cache.hf_cache.layers):
            # narrowing keeps the rows of initialized layers only: give every row its layer first
            self._forward(self.cache, [[] for _ in self.seq_ids], [])
        return self.cache.narrowed(rows)

    def _forward(self, cache: BatchKVCache, token_lists: list[list[int]], hidden: list[torch.Tensor]) -> torch.Tensor:
        """Append MTP entries to `cache`: row b gets tokens `token_lists[b]` with target (or chained)
        states `hidden[b]` `[T_b, H]`; returns the output state after each row's last entry. # [b, H]"""
        inputs = cache.prepare(token_lists, self.pad_token_id, self.dtype, self.max_position)
        num_query = inputs.input_ids.shape[1]
        states = torch.zeros(len(token_lists), num_query, self.mtp.config.hidden_size, dtype=self.dtype,
                             device=self.device)  # [b, T, H]
        for row, state in enumerate(hidden):  # none: a forward that feeds no row anything
            states[row, : len(state)] = state
        input_ids, position_ids = inputs.input_ids.to(self.device), inputs.position_ids.to(self.device)
        embeds = self.mtp.embed_tokens(input_ids)  # [b, T, H]
        with cache.undone_on_error():
            output = self.mtp.layers[0](embeds, states, position_embeddings=self.rotary(embeds, position_ids),
                                        attention_mask=inputs.attention_mask.to(self.device),
                                        position_ids=position_ids, cache=cache.hf_cache)  # [b, T, H]
        cache.commit(token_lists, inputs)
        last = torch.tensor([len(tokens) - 1 for tokens in token_lists], device=self.device)
        return output[torch.arange(len(token_lists), device=self.device), last]
