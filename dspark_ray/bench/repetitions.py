"""Repetitions of a benchmark run: their order, and the median run of each level with every run's
figure kept."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def interleaved(items: Iterable[T], repetitions: int) -> Iterator[T]:
    """Every item once per repetition, in reversed order every other repetition (A B, B A, A B, ...):
    drift on a shared machine hits the items alike, and so does going first (an A/A run in a fixed
    order favours one side: docs/design/reasons.md)."""
    items = list(items)
    for repetition in range(repetitions):
        yield from items if repetition % 2 == 0 else reversed(items)


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (the upper one of an even count), plus `<key>_runs`."""
    middle = sorted(runs, key=lambda run: run[key])[len(runs) // 2]
    return {**middle, f"{key}_runs": [run[key] for run in runs]}


def median_levels(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of repeated `bench serve` runs: per level, the run with the median output tokens/s."""
    levels = [median_run(list(runs), "output_tokens_per_s") for runs in zip(*(report["levels"] for report in reports))]
    return {**reports[0], "levels": levels}
