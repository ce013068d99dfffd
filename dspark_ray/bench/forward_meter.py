"""Counts and times a model's forward calls through hooks, so every benchmark row is measured alike."""

from __future__ import annotations

import time

import torch


class ForwardMeter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._started = 0.0
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args) -> None:
        self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - self._started

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
