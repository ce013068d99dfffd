"""Repetitions of a benchmark run: the median run of each level, with every run's figure kept."""

from __future__ import annotations

from typing import Any


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (the upper one of an even count), plus `<key>_runs`."""
    middle = sorted(runs, key=lambda run: run[key])[len(runs) // 2]
    return {**middle, f"{key}_runs": [run[key] for run in runs]}
