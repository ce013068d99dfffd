"""Classic speculative drafting with an independent small LM sharing the target's vocabulary.

Drafts autoregressively, batched over sequences, from the draft LM's own KV cache; after
verification the cache is rolled back to the longest prefix the target kept. The draft length
adapts per sequence ('confidence': stop once the draft doubts its own token; 'heuristic': HF's
+2/-1 schedule; 'off': fixed). With a time budget (a pipelined step: draft while the target
verifies the other micro-batch, no longer), greedy rows also stop where another forward would end
past it.

Look-ahead (within-request pipelining): while the target verifies a greedy draft, `look_ahead`
keeps drafting as if the whole draft were accepted, guessing the bonus token with the draft LM's
own argmax. When verification then commits exactly that (every draft kept, bonus as guessed), the
next `propose` starts from the look-ahead's drafts instead of drafting them again. Greedy drafts
depend only on the committed tokens, so a reused draft is the draft a fresh `propose` would make;
anything else discards the look-ahead. Sampled sequences never look ahead (their drafts would
consume draws from their RNG out of turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from dspark_ray.core.sampling import SamplingTensors, sample_from_probs
from dspark_ray.engine.drafters.base import DraftProbsTransform, DraftProposal, TargetFeatures, draft_distributions
from dspark_ray.engine.loading import context_limit
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import Sequence


@dataclass(frozen=True)
class LookAhead:
    assumed: list[int]  # the committed tokens the drafts follow: tokens, accepted draft, guessed bonus
    drafts: list[int]  # greedy drafts after `assumed`
    confident: bool  # the last draft was confident: drafting may go on from it


class DraftModelDrafter:
    def __init__(self, model: PreTrainedModel, num_speculative_tokens: int, adaptive: str = "confidence",
                 confidence_threshold: float = 0.3, pad_token_id: int = 0,
                 draft_probs_transform: DraftProbsTransform | None = None) -> None:
        self.runner = CausalLMRunner(model, pad_token_id)
        self.draft_probs_transform = draft_probs_transform
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_position = context_limit(model)
        self.num_speculative_tokens = num_speculative_tokens
        self.adaptive = adaptive
        self.confidence_threshold = confidence_threshold
        self.draft_length: dict[int, int] = {}  # per-sequence length for the 'heuristic' schedule
        self.look_aheads: dict[int, LookAhead] = {}
        self._confident_drafts: dict[int, list[int]] = {}  # last proposal's drafts that ended confident
        self.num_look_aheads = 0  # sequences looked ahead for, and proposals that reused a look-ahead
        self.num_look_ahead_hits = 0

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        """Nothing yet: a sequence joins the draft LM's cache at its first proposal with a budget
        (`_join`), so a sequence whose drafting is governed off costs the draft LM nothing."""

    def _join(self, seqs: list[Sequence], max_draft_tokens: list[int]) -> None:
        """Prefill, in one batch, the sequences about to draft for the first time (all committed
        tokens but the last, which the proposal feeds)."""
        new = {seq.seq_id: seq.token_ids[:-1] for seq, limit in zip(seqs, max_draft_tokens)
               if limit > 0 and seq.seq_id not in self.runner.seq_ids and seq.num_tokens < self.max_position}
        if new:
            self.runner.add(new)
            self.draft_length.update(dict.fromkeys(new, self.num_speculative_tokens))

    def remove(self, seq_ids: list[int]) -> None:
        self.runner.remove(seq_ids)
        for seq_id in seq_ids:
            self.draft_length.pop(seq_id, None)
            self.look_aheads.pop(seq_id, None)
            self._confident_drafts.pop(seq_id, None)

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
        self._join(seqs, max_draft_tokens)
        budgets = [self._budget(seq, limit) for seq, limit in zip(seqs, max_draft_tokens)]
        sampling = SamplingTensors.from_params([seq.request.sampling for seq in seqs])
        any_sampled = not bool(sampling.is_greedy.all())
        reused = [self._reused_drafts(seq, budget, any_sampled) for seq, budget in zip(seqs, budgets)]
        tokens = [list(drafts) for drafts, _ in reused]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        feed = {seq.seq_id: self.runner.uncached_suffix(seq.seq_id, seq.token_ids + drafts)
                for seq, budget, (drafts, confident) in zip(seqs, budgets, reused)
                if budget > 0 and len(drafts) < budget and confident}
        for seq, (drafts, confident) in zip(seqs, reused):
            self._confident_drafts.pop(seq.seq_id, None)
            if drafts and confident and seq.seq_id not in feed:
                self._confident_drafts[seq.seq_id] = drafts
        while feed:
            forward_start = time.perf_counter()
            logits = self._last_logits(feed, seqs)  # [B, V]
            draft_probs = (draft_distributions(logits, sampling, self.draft_probs_transform)  # [B, V]
                           if any_sampled else None)  # greedy drafts are argmaxes: no distributions
            chosen = self._choose(draft_probs, logits, sampling, seqs, feed)  # [B]
            confidence = torch.softmax(logits, -1).gather(1, chosen[:, None])[:, 0]  # [B]
            chosen_ids, confidences = chosen.tolist(), confidence.tolist()  # waits for the forward (on a GPU too)
            now = time.perf_counter()  # greedy rows stop where another forward like this one would end late
            out_of_time = deadline is not None and now + (now - forward_start) > deadline
            next_feed = {}
            for row, seq in enumerate(seqs):
                if seq.seq_id not in feed:
                    continue
                tokens[row].append(chosen_ids[row])
                if any_sampled:
                    probs[row].append(draft_probs[row])
                confident = self._confident(confidences[row])
                in_time = not out_of_time or not seq.request.sampling.is_greedy
                if len(tokens[row]) < budgets[row] and confident and in_time:
                    next_feed[seq.seq_id] = [chosen_ids[row]]
                elif confident and not any_sampled:
                    self._confident_drafts[seq.seq_id] = tokens[row]
            feed = next_feed
        return DraftProposal.from_lists(tokens, probs if any_sampled else None, self.vocab_size)

    def look_ahead(self, seqs: list[Sequence], should_stop: Callable[[], bool]) -> None:
        """Draft past the last proposal of `seqs` as if verification kept all of it, one batched
        forward at a time until `should_stop()`; only greedy drafts that ended confident go on."""
        assumed = {seq.seq_id: seq.token_ids + self._confident_drafts.pop(seq.seq_id) for seq in seqs
                   if seq.seq_id in self._confident_drafts and seq.seq_id in self.runner.seq_ids}
        chains: dict[int, list[int]] = {seq_id: [] for seq_id in assumed}
        confident = dict.fromkeys(assumed, True)
        feed = {seq_id: self.runner.uncached_suffix(seq_id, tokens) for seq_id, tokens in assumed.items()}
        while feed and not should_stop():
            logits = self.runner.forward(feed)  # [N, T, V] in the order of feed
            next_feed = {}
            for row, (seq_id, fed) in enumerate(feed.items()):
                row_logits = logits[row, len(fed) - 1]  # [V]
                token = int(row_logits.argmax())
                chains[seq_id].append(token)
                confident[seq_id] = self._confident(float(torch.softmax(row_logits, -1)[token]))
                if len(chains[seq_id]) <= self.num_speculative_tokens and confident[seq_id]:
                    next_feed[seq_id] = [token]
            feed = next_feed
        self.look_aheads.update({seq_id: LookAhead(assumed[seq_id] + chain[:1], chain[1:], confident[seq_id])
                                 for seq_id, chain in chains.items() if chain})
        self.num_look_aheads += sum(1 for chain in chains.values() if chain)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        for seq in seqs:  # a look-ahead survives only if verification committed what it assumed
            look_ahead = self.look_aheads.pop(seq.seq_id, None)
            if look_ahead is not None and look_ahead.assumed == seq.token_ids:
                self.look_aheads[seq.seq_id] = look_ahead
        self.runner.sync({seq.seq_id: seq.token_ids + self._kept_drafts(seq.seq_id) for seq in seqs
                          if seq.seq_id in self.runner.seq_ids})
        if self.adaptive == "heuristic":
            for seq, drafted, accepted in zip(seqs, num_drafted, num_accepted):
                if drafted:  # a step without drafts (governed off, no budget) says nothing
                    length = self.draft_length[seq.seq_id]
                    self.draft_length[seq.seq_id] = length + 2 if accepted == drafted else max(1, length - 1)

    def _kept_drafts(self, seq_id: int) -> list[int]:
        look_ahead = self.look_aheads.get(seq_id)
        return [] if look_ahead is None else look_ahead.drafts

    def _reused_drafts(self, seq: Sequence, budget: int, any_sampled: bool) -> tuple[list[int], bool]:
        """The look-ahead's drafts if the committed tokens are what it assumed, and whether the
        last of them was confident; ([], True) when there is nothing to reuse."""
        look_ahead = self.look_aheads.pop(seq.seq_id, None)
        if any_sampled or look_ahead is None or budget == 0 or look_ahead.assumed != seq.token_ids:
            return [], True
        drafts = look_ahead.drafts[:budget]
        self.num_look_ahead_hits += 1
        return drafts, look_ahead.confident or len(drafts) < len(look_ahead.drafts)

    def _budget(self, seq: Sequence, limit: int) -> int:
        if seq.seq_id not in self.runner.seq_ids:
            return 0
        room = self.max_position - seq.num_tokens + 1  # the draft LM's own context limit
        schedule = self.draft_length[seq.seq_id] if self.adaptive == "heuristic" else self.num_speculative_tokens
        return max(0, min(limit, room, schedule))

    def _confident(self, confidence: float) -> bool:
        return self.adaptive != "confidence" or confidence >= self.confidence_threshold

    def _last_logits(self, feed: dict[int, list[int]], seqs: list[Sequence]) -> torch.Tensor:
        logits = self.runner.forward(feed)  # [N, T, V] in the order of feed
        row_of = {seq_id: row for row, seq_id in enumerate(feed)}
        rows = [row_of.get(seq.seq_id, 0) for seq in seqs]
        last = [len(feed[seq.seq_id]) - 1 if seq.seq_id in feed else 0 for seq in seqs]
        return logits[torch.tensor(rows), torch.tensor(last)]

    @staticmethod
    def _choose(draft_probs: torch.Tensor | None, logits: torch.Tensor, sampling: SamplingTensors,
                seqs: list[Sequence], feed: dict[int, list[int]]) -> torch.Tensor:
        """Greedy rows take the argmax; sampled rows that are drafting draw from their own RNG
        (only those, so a sequence's randomness never depends on its batch neighbours)."""
        chosen = logits.argmax(-1)  # [B]
        for row, seq in enumerate(seqs):
            if seq.seq_id in feed and not seq.request.sampling.is_greedy:
                chosen[row] = sample_from_probs(draft_probs[row : row + 1], [seq.generator])[0]
        return chosen
