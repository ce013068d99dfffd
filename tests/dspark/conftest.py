"""Session fixtures for DSpark tests: tiny targets (from tests/engine/tiny_models.py) and tiny DSpark
drafters for them, random-init or briefly trained, built once per session."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from tiny_dspark import TinyDSpark, build_tiny_dspark  # noqa: E402
from tiny_models import TinyModels, greedy_reference, pair_builder  # noqa: E402

torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a 2-core machine
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory) -> Callable[[str], TinyModels]:
    return pair_builder(tmp_path_factory.mktemp("dspark-targets"))


@pytest.fixture(scope="session")
def tiny_dspark(tiny_targets, tmp_path_factory) -> Callable[..., TinyDSpark]:
    """tiny_dspark(arch, head, block_size, trained): a drafter saved to disk, built once per key."""
    root = tmp_path_factory.mktemp("dspark-drafters")
    built: dict[tuple, TinyDSpark] = {}

    def get(arch: str, head: str = "gated", block_size: int = 4, trained: bool = True) -> TinyDSpark:
        key = (arch, head, block_size, trained)
        if key not in built:
            directory = root / "-".join(map(str, key))
            built[key] = build_tiny_dspark(tiny_targets(arch).target, directory, head, block_size, trained)
        return built[key]

    return get


@pytest.fixture(scope="session")
def reference(tiny_targets) -> Callable[[str, tuple[int, ...], int], list[int]]:
    cache: dict[tuple, list[int]] = {}

    def get(arch: str, prompt: tuple[int, ...], max_new_tokens: int) -> list[int]:
        key = (arch, tuple(prompt), max_new_tokens)
        if key not in cache:
            cache[key] = greedy_reference(tiny_targets(arch).target, list(prompt), max_new_tokens)
        return cache[key]

    return get
