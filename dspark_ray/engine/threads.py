"""The intra-op thread pool of a process that runs forwards: how many threads, on which CPUs, at
what priority. The one place the rule lives (docs/threads.md has the figures behind it):

1. CPUs: the process's affinity mask (what the OS, a container, taskset or Ray left it), or the
   CPU ids it is given to pin itself to (`cpus`: dedicated cores, e.g. `engine_cpus`).
2. Threads: one per CPU of those that other processes left idle during a short look at
   `/proc/stat`, at least one. An intra-op pool waits at every op for its slowest thread, so a
   thread on a core another process keeps busy stalls all the others: on a shared machine one
   thread beats two by far. An explicit number is honoured (capped at the CPUs), with a warning
   when it exceeds the idle CPUs.
3. Pinning: only onto CPUs given explicitly. The pool is not pinned onto the whole mask: on a
   shared machine a pinned thread cannot leave a core that another process has taken.
4. Priority: a process that inherited a positive niceness (Ray starts its workers at nice 15, and
   children inherit it) asks for niceness 0. Linux lets an unprivileged process only raise its
   niceness (lowering needs CAP_SYS_NICE or an RLIMIT_NICE that allows it), so where that is
   refused the niceness stays and `ThreadPlan.niceness` says so.

This module knows nothing about models or engines; it reads /proc and calls torch and os.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SAMPLE_S = 0.2  # how long /proc/stat is watched to tell busy CPUs from idle ones
BUSY_FRACTION = 0.5  # a CPU that others kept at least this busy gets no thread of ours


@dataclass(frozen=True)
class ThreadPlan:
    num_threads: int  # intra-op threads set with torch.set_num_threads
    cpus: tuple[int, ...]  # the CPUs the process may run on (its affinity mask, after pinning)
    busy_cpus: tuple[int, ...]  # CPUs of the mask that others kept busy when the pool was sized
    pinned: bool  # the process was pinned onto `cpus`
    niceness: int  # the process's niceness afterwards


def configure_threads(requested: int | None = None, cpus: Sequence[int] | None = None) -> ThreadPlan:
    """Apply the rule of the module docstring to this process and say what it did. `requested`:
    an explicit thread count (None or 0: size from the idle CPUs); `cpus`: CPU ids to pin to."""
    pinned = cpus is not None
    if pinned:
        os.sched_setaffinity(0, cpus)
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    busy = busy_cpus(allowed)
    idle = max(1, len(allowed) - len(busy))
    num_threads = min(requested, len(allowed)) if requested else idle
    if num_threads > idle:
        logger.warning("%d torch threads with %d of %d CPUs busy: each op waits for a thread that shares a "
                       "busy core (fewer threads are faster here)", num_threads, len(busy), len(allowed))
    torch.set_num_threads(num_threads)
    plan = ThreadPlan(num_threads, allowed, busy, pinned, reset_niceness())
    logger.info("torch threads: %s", plan)
    return plan


def busy_cpus(cpus: Sequence[int], sample_s: float = SAMPLE_S) -> tuple[int, ...]:
    """The CPUs among `cpus` that were at least BUSY_FRACTION busy over `sample_s` seconds (this
    process is idle meanwhile, so the time is other processes'). Empty where /proc/stat cannot be
    read (not Linux): every CPU counts as idle."""
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    busy = []
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            continue
        total = sum(after[cpu]) - sum(before[cpu])
        idle = _idle(after[cpu]) - _idle(before[cpu])
        if total > 0 and 1 - idle / total >= BUSY_FRACTION:
            busy.append(cpu)
    return tuple(busy)


def reset_niceness() -> int:
    """Ask for niceness 0 if the process runs nicer than that; returns the niceness it has after."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            logger.info("niceness stays %d: lowering it needs CAP_SYS_NICE or RLIMIT_NICE", niceness)
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
    return niceness


def _cpu_times() -> dict[int, list[int]]:
    """Per-CPU jiffies from /proc/stat (user nice system idle iowait irq softirq steal)."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            times[int(name[3:])] = [int(field) for field in fields[:8]]
    return times


def _idle(times: list[int]) -> int:
    return times[3] + times[4]  # idle + iowait
