"""The thread rule of `engine.threads`: busy CPUs get no thread, an explicit count is honoured
within the mask, and a nice process asks for niceness 0 where the OS allows it."""

import os
import resource
import subprocess
import sys

import pytest
import torch

from dspark_ray.engine import threads

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_stat(monkeypatch, before: dict[int, list[int]], after: dict[int, list[int]]) -> None:
    samples = iter([before, after])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))


def jiffies(busy: int, idle: int) -> list[int]:
    return [busy, 0, 0, idle, 0, 0, 0, 0]  # user nice system idle iowait irq softirq steal


def test_busy_cpus_are_those_others_kept_busy(monkeypatch):
    fake_stat(monkeypatch, {0: jiffies(0, 0), 1: jiffies(0, 0), 2: jiffies(0, 0)},
              {0: jiffies(90, 10), 1: jiffies(10, 90), 2: jiffies(50, 50)})
    assert threads.busy_cpus([0, 1, 2], sample_s=0) == (0, 2)


def test_unreadable_stat_counts_every_cpu_idle(monkeypatch):
    fake_stat(monkeypatch, {}, {})
    assert threads.busy_cpus([0, 1], sample_s=0) == ()


def test_automatic_size_leaves_busy_cpus_out(monkeypatch):
    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: tuple(cpus[1:]))
    plan = threads.configure_threads()
    assert plan.num_threads == 1 == torch.get_num_threads()
    assert plan.busy_cpus == tuple(allowed[1:]) and not plan.pinned
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: tuple(cpus))
    assert threads.configure_threads().num_threads == 1  # all busy: still one thread


def test_explicit_count_is_honoured_within_the_mask(monkeypatch):
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: tuple(cpus))  # even where every CPU is busy
    allowed = len(os.sched_getaffinity(0))
    assert threads.configure_threads(1).num_threads == 1 == torch.get_num_threads()
    assert threads.configure_threads(allowed + 3).num_threads == allowed


def test_pinning_sets_the_mask():
    cpu = min(os.sched_getaffinity(0))
    code = ("from dspark_ray.engine.threads import configure_threads; import os; "
            f"plan = configure_threads(cpus=[{cpu}]); print(plan.cpus, plan.pinned, plan.num_threads, "
            "sorted(os.sched_getaffinity(0)))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split("\n")[0] == f"({cpu},) True 1 [{cpu}]"


def test_inherited_niceness_is_reset_where_permitted():
    code = "import os; os.nice(5); from dspark_ray.engine.threads import reset_niceness; print(reset_niceness())"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lowest_allowed = 20 - resource.getrlimit(resource.RLIMIT_NICE)[0]  # RLIMIT_NICE: nice >= 20 - limit
    expected = 0 if os.geteuid() == 0 or lowest_allowed <= 0 else 5
    assert int(output.strip().splitlines()[-1]) == expected
