"""Fixtures of the distributed-backend tests: ONE local Ray cluster per pytest session (reused if
another conftest started it), tiny checkpoints built once, engines built once per module.

The machine running CI has 2 cores shared with other jobs: workers reserve ~no CPU
(`num_cpus=0`-like bundles) and run one torch thread each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine"))  # the engine tests' tiny models

from serving_helpers import start_local_ray  # noqa: E402
from tiny_models import TinyModels, pair_builder  # noqa: E402

from dspark_ray.config import EngineConfig  # noqa: E402
from dspark_ray.engine.factory import build_engine, load_models  # noqa: E402
from dspark_ray.engine.sequence import GenerationRequest, Sequence  # noqa: E402

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

# Ragged prompts with repeats (so n-gram lookup finds matches); no EOS in the tiny vocabulary.
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 9, 10], [20, 21], [30, 31, 32, 33, 30, 31, 32], [40, 41, 42]]
MAX_TOKENS = 20


def pytest_collection_modifyitems(config, items) -> None:
    """A hung worker must fail its test, not stall the session (needs pytest-timeout)."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(300))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:  # the same cluster as tests/serving/conftest.py's ray_cluster, whichever starts first
        start_local_ray()
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[[str], TinyModels]:
    return pair_builder(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def local_outputs() -> Callable[[EngineConfig, list[GenerationRequest]], list[list[int]]]:
    """The in-process engine's outputs for the same config (the oracle), cached."""
    cache: dict = {}

    def get(config: EngineConfig, requests: list[GenerationRequest]) -> list[list[int]]:
        key = (config.model_dump_json(), repr(requests))
        if key not in cache:
            engine = build_engine(config, load_models(config))
            cache[key] = [seq.output_token_ids for seq in engine.generate(requests)]
        return cache[key]

    return get


@pytest.fixture(scope="session")
def engines_for(ray_session) -> Iterator[Callable[..., tuple]]:
    """engines_for(config, **placement) -> (engine, decode), each built once per session (worker
    start-up dominates these tests) and shut down at its end."""
    from dspark_ray.serving.distributed import WorkerPlacement, build_distributed_engine

    built: dict[tuple, tuple] = {}

    def get(config: EngineConfig, **placement) -> tuple:
        key = (config.model_dump_json(), tuple(sorted(placement.items())))
        if key not in built:
            settings = {"startup_timeout_s": 180, "target_timeout_s": 30, "draft_timeout_s": 10, **placement}
            built[key] = build_distributed_engine(config, WorkerPlacement(**settings))
        return built[key]

    yield get
    for engine, _ in built.values():
        engine.shutdown()


@pytest.fixture(scope="session")
def distributed_engines(engines_for, tiny) -> Callable[..., tuple]:
    """distributed_engines(arch, drafter, **placement) -> (engine, decode, config) on the tiny pair."""

    def get(arch: str, drafter: str, **placement) -> tuple:
        config = engine_config(tiny(arch), drafter)
        return (*engines_for(config, **placement), config)

    return get


def engine_config(models: TinyModels, drafter: str, **overrides) -> EngineConfig:
    # Always drafting: on the tiny pair the governor would soon (rightly) turn drafting off, and
    # these tests are about the drafting machinery; test_governor_is_wired covers the default.
    settings = {"num_speculative_tokens": 4, "load_aware_drafting": False, **overrides}
    return EngineConfig(target=models.target_dir, draft=models.draft_dir, drafter=drafter, **settings)


def greedy_requests(max_tokens: int = MAX_TOKENS) -> list[GenerationRequest]:
    return [GenerationRequest(prompt, max_tokens=max_tokens) for prompt in PROMPTS]


def outputs(seqs: list[Sequence]) -> list[list[int]]:
    return [seq.output_token_ids for seq in seqs]
