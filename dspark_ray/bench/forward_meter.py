"""Counts and times a model's forward calls through hooks, so every benchmark row is measured alike.

The meter sees only top-level calls of the module it wraps; it knows nothing of what a call was for
(prefill, decode, verification): callers tell calls apart by their order (`durations`)."""

from __future__ import annotations

import time

import torch


class ForwardMeter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.durations: list[float] = []  # seconds of each call since the last reset, in call order
        self._started = 0.0
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after)]

    @property
    def calls(self) -> int:
        return len(self.durations)

    @property
    def seconds(self) -> float:
        return sum(self.durations)

    def _before(self, module, args) -> None:
        self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.durations.append(time.perf_counter() - self._started)

    def reset(self) -> None:
        self.durations = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
