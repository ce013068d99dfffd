"""Session fixtures for engine tests: tiny checkpoints built once, greedy references cached, and a
spy on KV-cache compaction."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import transformers

from dspark_ray.engine.kv_cache import BatchKVCache
from harness import DRAFT_QUALITY
from tiny_models import ARCHITECTURES, WINDOWED_ARCHITECTURES, TinyModels, greedy_reference, pair_builder

# The models are tiny: a second intra-op thread only adds contention on the 2-core CI machine
# (measured ~25x slower per engine run with 2 threads under load).
torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

def pytest_terminal_summary(terminalreporter) -> None:
    if DRAFT_QUALITY:
        terminalreporter.write_sep("-", "tiny draft vs target (engine tests)")
        for arch in ARCHITECTURES + WINDOWED_ARCHITECTURES:
            if arch in DRAFT_QUALITY:
                terminalreporter.write_line(f"{arch:12s} {DRAFT_QUALITY[arch]}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[[str], TinyModels]:
    """tiny(arch): that architecture's target and draft, saved and loaded back, built once."""
    return pair_builder(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def reference(tiny) -> Callable[[str, Sequence[int], int], list[int]]:
    """reference(arch, prompt, n): the target alone, HF greedy `generate` with max_new_tokens=n."""
    cache: dict[tuple, list[int]] = {}

    def get(arch: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        key = (arch, tuple(prompt), max_new_tokens)
        if key not in cache:
            cache[key] = greedy_reference(tiny(arch).target, list(prompt), max_new_tokens)
        return cache[key]

    return get


@pytest.fixture
def compactions(monkeypatch) -> list[tuple[int, int]]:
    """Records (slots before, slots after) of every `BatchKVCache.compact` call; behaviour unchanged."""
    calls: list[tuple[int, int]] = []
    compact = BatchKVCache.compact

    def spy(self: BatchKVCache) -> None:
        before = self.num_slots
        compact(self)
        calls.append((before, self.num_slots))

    monkeypatch.setattr(BatchKVCache, "compact", spy)
    return calls
