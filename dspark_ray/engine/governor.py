"""Load-aware speculation: draft only at the batch sizes where drafting pays, and as far as it pays.

Whether drafting pays depends on the load. At batch 1 a target forward costs about the same for 1
or 9 tokens per sequence, so drafts are nearly free to verify; at high batch sizes the target (or
the drafter) becomes compute-bound and verifying drafts can cost more than it returns. vLLM turns
speculation off above a fixed batch size; the governor measures instead: per batch-size bucket
(powers of two), a `StrategyChooser` times steps with and without drafting and keeps whichever
commits more tokens per second. While drafting runs, a second one times the full draft length
against a short one (a draft LM pays one forward per draft token for the whole batch: at c=16 on
a CPU, 4 drafts per step beat 8 where 8 only broke even); the on/off explorations time drafting at
the length that chooser prefers (on worker actors, mixing both lengths into them made drafting look
closer to the target alone than it is, and the governor kept re-exploring), and at the short one
until it has a verdict: a new bucket's first explorations then cost little where drafting loses
(in-process DSpark at c=16 on a CPU, drafting forced to 8 ran at 0.78x of the target alone, to 4
at 0.99x), and where drafting pays the length chooser soon finds whether the full length pays
more. Drafting off is the target alone: never different, and never slower than it by more than
the exploration costs.

Only greedy sequences are governed: a sampled sequence's random draws follow its drafts, so
switching its drafting on timing would make seeded outputs depend on the machine's speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dspark_ray.engine.strategy_chooser import StrategyChooser


class DraftingPolicy(Protocol):
    def draft_limit(self, batch_size: int) -> int | None:
        """The most drafts per greedy sequence in the next step of `batch_size` sequences: None for
        no limit beyond the engine's own, 0 for none."""

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        """How that step went: tokens committed by its drafting and verification, and their seconds."""


# Drafting that loses at a load usually loses by 15-40% (measured on worker actors at c=16), and each
# exploration drafts for a whole window at that loss: a verdict 1.25x apart settles at once, and a
# repeated one quadruples the next run, so a lost cause costs few explorations. A new bucket times
# the target alone first: it leaves nothing behind, while a drafting block leaves KV holes that a
# drafting-off block after it would pay for (a served c=16 replica measured the draft LM 1.27x
# faster that way and settled on drafting, which then ran at 0.88x of target-only). Timed that
# way round, the first verdict leans against drafting: safe to settle on when it is decisive.
DECISIVE = 1.25
GROWTH = 4
# A verdict that repeats the last one settles at 1.15x apart: on worker actors at c=16 four verdicts
# in a row came out 1.18-1.24x against drafting, each just short of 1.25, and each exploration cost
# drafting steps at that loss.
CONFIRMING = 1.15
# Both modes are timed in alternating blocks of 4 steps, not one window each: in a served c=16 run
# a first window of steps undrafted, then one drafting, met different batches (admissions, a batch
# shrunk to 11; acceptance varies from batch to batch, 1.5-4.9 tokens per sequence and step).
BLOCK = 4


@dataclass
class _Bucket:
    drafting: StrategyChooser  # on or off
    full_length: StrategyChooser | None  # while drafting: the full draft length (True) or the short one


class SpeculationGovernor:
    def __init__(self, short_limit: int | None = None, window: int = 16, exploit_windows: int = 2,
                 max_exploit_windows: int = 128, block: int | None = BLOCK) -> None:
        """`short_limit`: the draft length timed against the full one (None: only on or off)."""
        self.short_limit = short_limit
        self.window = window
        self.block = block
        self.exploit_windows = exploit_windows
        self.max_exploit_windows = max_exploit_windows
        self.buckets: dict[int, _Bucket] = {}  # by the batch size rounded up to a power of 2

    def draft_limit(self, batch_size: int) -> int | None:
        bucket = self._bucket(batch_size)
        if not bucket.drafting.next_mode():
            return 0
        if bucket.full_length is None:
            return None
        if bucket.drafting.exploring:  # drafting is timed at the length it would run at (short: no verdict yet)
            full = bucket.full_length.preferred is True
        else:  # lengths are timed while drafting runs
            full = bucket.full_length.next_mode()
        return None if full else self.short_limit

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        # Tokens per sequence, scaled to a full bucket: a step of 11 sequences counts 11/16 of its
        # seconds in the bucket of 16, so a block that ran while requests came and went (fewer
        # tokens per step in either mode) does not lose its verdict to the batch size alone.
        seconds = seconds * batch_size / bucket_size(batch_size)
        bucket = self._bucket(batch_size)
        bucket.drafting.record(draft_limit != 0, num_tokens, seconds)
        if draft_limit != 0 and bucket.full_length is not None and not bucket.drafting.exploring:
            bucket.full_length.record(draft_limit is None, num_tokens, seconds)

    def rates(self) -> dict[int, dict[bool, float]]:
        """Tokens/s of a full bucket with (True) and without (False) drafting at the last
        exploration, by bucket."""
        return {size: dict(bucket.drafting.rates) for size, bucket in sorted(self.buckets.items())
                if bucket.drafting.rates}

    def length_rates(self) -> dict[int, dict[bool, float]]:
        """The same for drafting steps at the full (True) and the short (False) draft length."""
        return {size: dict(bucket.full_length.rates) for size, bucket in sorted(self.buckets.items())
                if bucket.full_length is not None and bucket.full_length.rates}

    def _bucket(self, batch_size: int) -> _Bucket:
        size = bucket_size(batch_size)
        if size not in self.buckets:
            self.buckets[size] = _Bucket(
                self._chooser(explore_first=False),  # the target alone first (see above)
                self._chooser(explore_first=True) if self.short_limit else None)  # the full length first
        return self.buckets[size]

    def _chooser(self, explore_first: bool) -> StrategyChooser:
        return StrategyChooser(self.window, self.exploit_windows, self.max_exploit_windows,
                               explore_first=explore_first, decisive=DECISIVE, growth=GROWTH, block=self.block,
                               confirming=CONFIRMING)


class DraftingCap:
    """No drafting in steps of more than `max_batch_size` sequences; at or below it, `policy` decides
    (None: the full length). A fixed rule where the governor measures: it costs no explorations at
    loads where a drafter is known not to pay."""

    def __init__(self, max_batch_size: int, policy: DraftingPolicy | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.policy = policy

    def draft_limit(self, batch_size: int) -> int | None:
        if batch_size > self.max_batch_size:
            return 0
        return None if self.policy is None else self.policy.draft_limit(batch_size)

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        if self.policy is not None and batch_size <= self.max_batch_size:
            self.policy.record(batch_size, draft_limit, num_tokens, seconds)


def bucket_size(batch_size: int) -> int:
    """The batch size rounded up to a power of 2."""
    return 1 << max(0, batch_size - 1).bit_length()
