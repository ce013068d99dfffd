"""Load-aware speculation: draft only at the batch sizes where drafting pays.

Whether drafting pays depends on the load. At batch 1 a target forward costs about the same for 1
or 9 tokens per sequence, so drafts are nearly free to verify; at high batch sizes the target (or
the drafter) becomes compute-bound and verifying drafts can cost more than it returns. vLLM turns
speculation off above a fixed batch size; the governor measures instead: per batch-size bucket
(powers of two), a `StrategyChooser` times steps with and without drafting and keeps whichever
commits more tokens per second. Drafting off is the target alone: never different, and never
slower than it by more than the exploration costs.

Only greedy sequences are governed: a sampled sequence's random draws follow its drafts, so
switching its drafting on timing would make seeded outputs depend on the machine's speed.
"""

from __future__ import annotations

from typing import Protocol

from dspark_ray.engine.strategy_chooser import StrategyChooser


class DraftingPolicy(Protocol):
    def drafting(self, batch_size: int) -> bool:
        """Whether greedy sequences draft in the next step of `batch_size` sequences."""

    def record(self, batch_size: int, drafted: bool, num_tokens: int, seconds: float) -> None:
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
# Both modes are timed in alternating blocks of 4 steps, not one window each: in a served c=16 run
# a first window of steps undrafted, then one drafting, met different batches (admissions, sequences
# early in their generations, where the draft LM is accepted far more often than later).
BLOCK = 4


class SpeculationGovernor:
    def __init__(self, window: int = 16, exploit_windows: int = 2, max_exploit_windows: int = 128,
                 block: int | None = BLOCK) -> None:
        self.window = window
        self.block = block
        self.exploit_windows = exploit_windows
        self.max_exploit_windows = max_exploit_windows
        self.choosers: dict[int, StrategyChooser] = {}  # by bucket: the batch size rounded up to a power of 2

    def drafting(self, batch_size: int) -> bool:
        return self._chooser(batch_size).next_mode()

    def record(self, batch_size: int, drafted: bool, num_tokens: int, seconds: float) -> None:
        # Tokens per sequence, scaled to a full bucket: a step of 11 sequences counts 11/16 of its
        # seconds in the bucket of 16, so a block that ran while requests came and went (fewer
        # tokens per step in either mode) does not lose its verdict to the batch size alone.
        self._chooser(batch_size).record(drafted, num_tokens, seconds * batch_size / _bucket(batch_size))

    def rates(self) -> dict[int, dict[bool, float]]:
        """Tokens/s of a full bucket with (True) and without (False) drafting at the last
        exploration, by bucket."""
        return {bucket: dict(chooser.rates) for bucket, chooser in sorted(self.choosers.items()) if chooser.rates}

    def _chooser(self, batch_size: int) -> StrategyChooser:
        bucket = _bucket(batch_size)
        if bucket not in self.choosers:
            self.choosers[bucket] = StrategyChooser(self.window, self.exploit_windows, self.max_exploit_windows,
                                                    explore_first=False, decisive=DECISIVE, growth=GROWTH,
                                                    block=self.block)
        return self.choosers[bucket]


def _bucket(batch_size: int) -> int:
    """The batch size rounded up to a power of 2."""
    return 1 << max(0, batch_size - 1).bit_length()
