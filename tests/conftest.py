"""Test levels, one marker per test, so each level runs alone (`pytest -m unit`, `-m engine`, `-m ray`):

- `ray`: starts Ray (the session's local cluster, or a `dspark-ray serve` process of its own);
- `engine`: runs models (tiny or bundled checkpoints) without Ray;
- `unit`: neither; the whole level takes well under a minute.

A test is `ray` when it uses a Ray fixture (`RAY_FIXTURES`) or its module says `pytestmark =
pytest.mark.ray`; `engine` when it uses a model fixture or its module says `pytest.mark.engine`;
otherwise `unit`. Tests of the benchmark commands also carry `bench` (files named test_bench_*).
"""

from __future__ import annotations

import pytest

LEVELS = ("ray", "engine", "unit")
RAY_FIXTURES = frozenset({"ray_cluster", "ray_session", "serve_instance", "any_app"})
MODEL_FIXTURES = frozenset({"tiny", "tiny_targets", "tiny_dspark", "reference", "model_dirs", "engine_config"})


def level_of(item: pytest.Item) -> str:
    marked = {mark.name for mark in item.iter_markers()} & set(LEVELS)
    fixtures = set(getattr(item, "fixturenames", ()))
    if "ray" in marked or fixtures & RAY_FIXTURES:
        return "ray"
    if "engine" in marked or fixtures & MODEL_FIXTURES:
        return "engine"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        level = level_of(item)
        if level not in {mark.name for mark in item.iter_markers()}:
            item.add_marker(level)
        if item.path.name.startswith("test_bench_"):
            item.add_marker("bench")
