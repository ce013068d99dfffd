"""Pick the faster of two step strategies online, by committed tokens per second.

Used for pipelining on or off (`serving.distributed.pipeline`) and for drafting on or off at each
load level (`engine.governor`). Each exploration runs both strategies for `window` steps, then the
faster one runs for `exploit_windows` windows, then both are explored again (traffic changes). A
winner that wins again multiplies the next exploitation by `growth`, up to `max_exploit_windows`,
so a settled choice soon costs little exploration while an early, noisy verdict is soon
re-examined; a change of winner resets it. A decisive verdict (faster by more than `decisive`
times, or by more than `confirming` times when it repeats the last one) goes straight to the
longest exploitation.
An exploration only ends once both strategies have recorded steps.
Explorations alternate the strategies in blocks of `block` steps (by default one block each), not
step by step: a step can leave costs to the next one (with worker actors, rolling back rejected
drafts travels with the next command; drafting leaves holes in the KV cache that every later step
attends over until a compaction), which alternation would charge to the other strategy. Several
shorter blocks time both strategies under the same conditions where those drift within a window
(requests coming and going, and how well a batch's drafts are accepted, change from block to block).
Each pair starts with the incumbent (the last winner; `explore_first` before any verdict), so it
is timed in the state it runs in, and the challenger's block pays the switch into it.
"""

from __future__ import annotations

from collections import deque


class StrategyChooser:
    def __init__(self, window: int = 8, exploit_windows: int = 16, max_exploit_windows: int | None = None,
                 explore_first: bool = False, decisive: float = float("inf"), growth: int = 2,
                 block: int | None = None, confirming: float | None = None) -> None:
        self.window = window
        self.block = block or window  # steps per block of an exploration; each strategy runs window steps
        self.growth = growth
        self.explore_first = explore_first  # the strategy the first exploration starts with
        self.decisive = decisive
        self.confirming = decisive if confirming is None else confirming  # the bar for a repeated verdict
        self.base_exploit_windows = self.exploit_windows = exploit_windows
        self.max_exploit_windows = exploit_windows if max_exploit_windows is None else max_exploit_windows
        self.rates: dict[bool, float] = {}  # tokens/s of the last exploration, by strategy
        self._plan: deque[bool] = deque()
        self._exploring = False
        self._totals = {True: [0, 0.0], False: [0, 0.0]}  # tokens, seconds while exploring

    def next_mode(self) -> bool:
        if not self._plan:
            self._replan()
        return self._plan.popleft()

    def record(self, mode: bool, num_tokens: int, seconds: float) -> None:
        if self._exploring:
            self._totals[mode][0] += num_tokens
            self._totals[mode][1] += seconds

    @property
    def exploring(self) -> bool:
        return self._exploring

    @property
    def preferred(self) -> bool | None:
        return None if len(self.rates) < 2 else self.rates[True] > self.rates[False]

    def _replan(self) -> None:
        if self._exploring and any(seconds == 0 for _, seconds in self._totals.values()):
            self._explore()  # a strategy went unmeasured (its steps were not recorded): explore on
        elif self._exploring:
            previous = self.preferred
            self.rates = {mode: tokens / max(seconds, 1e-9) for mode, (tokens, seconds) in self._totals.items()}
            self._totals = {True: [0, 0.0], False: [0, 0.0]}
            self._exploring = False
            slower, faster = sorted(self.rates.values())
            repeated = self.preferred == previous
            if faster > self.decisive * slower or (repeated and faster > self.confirming * slower):
                self.exploit_windows = self.max_exploit_windows
            elif repeated:
                self.exploit_windows = min(self.growth * self.exploit_windows, self.max_exploit_windows)
            else:
                self.exploit_windows = self.base_exploit_windows
            self._plan.extend([self.preferred] * (self.window * self.exploit_windows))
        else:
            self._exploring = True
            self._explore()

    def _explore(self) -> None:
        first = self.explore_first if self.preferred is None else self.preferred
        for start in range(0, self.window, self.block):
            length = min(self.block, self.window - start)
            self._plan.extend([first] * length + [not first] * length)
