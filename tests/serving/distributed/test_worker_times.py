"""Worker idle fractions, the figure `bench distributed` and the GPU check report per worker."""

from __future__ import annotations

import pytest

from dspark_ray.serving.distributed.builder import WorkerTimes


def test_idle_fraction_of_a_working_worker() -> None:
    assert WorkerTimes(busy_s=3.0, idle_s=1.0, num_commands=10).idle_fraction == pytest.approx(0.25)


def test_a_worker_that_got_no_command_was_idle_throughout() -> None:
    assert WorkerTimes(busy_s=0.0, idle_s=0.0, num_commands=0).idle_fraction == 1.0
