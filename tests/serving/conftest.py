"""Session fixtures for serving tests: ONE local Ray cluster and ONE Serve instance per pytest session.

The machine is small and shared, so every Ray test in the session uses `ray_cluster` (a fresh
local cluster, never one that happens to run on the machine) and every Serve test uses
`serve_instance` (HTTP and gRPC on free ports). Applications are deployed once per session:
`served_app` (the main one, at /) and `tiny_app` (one slot, a queue of one, API keys, at /tiny).

Models: the bundled reference pair when it is there, else the stand-in at /tmp/ref; tests that
need models are skipped when neither exists. Point `MODEL_ROOTS` elsewhere to test other models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving_helpers import ALICE_KEY, BOB_KEY, FALLBACK_CHAT_TEMPLATE, start_local_ray

from dspark_ray.serving.ports import free_port
from dspark_ray.config import REFERENCE_DIR, EngineConfig
from dspark_ray.serving.config import GRPC_SERVICER_FUNCTION, AppConfig

MODEL_ROOTS = (REFERENCE_DIR, Path("/tmp/ref"))


@dataclass(frozen=True)
class ModelDirs:
    target: Path
    draft: Path


@dataclass(frozen=True)
class ServeEndpoints:
    http_port: int
    grpc_port: int


@dataclass(frozen=True)
class ServedApp:
    name: str
    config: AppConfig
    root_url: str  # http://127.0.0.1:port/prefix
    grpc_target: str  # 127.0.0.1:port

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def num_active(self) -> int:
        """Sequences the app's model server holds right now."""
        from ray import serve

        deployment = "Router" if self.config.colocate_router else "ModelServer"  # colocated: one deployment
        return serve.get_deployment_handle(deployment, self.name).num_active.remote().result()

    def wait_until_idle(self, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while (active := self.num_active()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return active


@pytest.fixture(scope="session")
def model_dirs() -> ModelDirs:
    for root in MODEL_ROOTS:
        if (root / "target" / "config.json").is_file() and (root / "draft" / "config.json").is_file():
            return ModelDirs(root / "target", root / "draft")
    pytest.skip(f"no model pair in {[str(r) for r in MODEL_ROOTS]}")


@pytest.fixture(scope="session")
def engine_config(model_dirs: ModelDirs) -> EngineConfig:
    # Always drafting: tests compare per-request speculation stats across runs, which the
    # load-aware governor would make depend on timing (outputs never do).
    return EngineConfig(target=model_dirs.target, draft=model_dirs.draft, drafter="model", load_aware_drafting=False)


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # someone in this session already started it: share, do not own
        yield ray
        return
    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_instance(ray_cluster) -> ServeEndpoints:
    from ray import serve

    endpoints = ServeEndpoints(free_port(), free_port())
    serve.start(http_options={"host": "127.0.0.1", "port": endpoints.http_port},
                grpc_options={"port": endpoints.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]})
    yield endpoints
    serve.shutdown()


def _chat_template(model_dirs: ModelDirs) -> str | None:
    from dspark_ray.engine.loading import load_tokenizer

    return None if load_tokenizer(model_dirs.target).chat_template else FALLBACK_CHAT_TEMPLATE


def _deploy(endpoints: ServeEndpoints, name: str, prefix: str, config: AppConfig) -> ServedApp:
    from ray import serve

    from dspark_ray.serving.app import build_app

    serve.run(build_app(config), name=name, route_prefix=prefix)
    root = f"http://127.0.0.1:{endpoints.http_port}{prefix.rstrip('/')}"
    return ServedApp(name, config, root, f"127.0.0.1:{endpoints.grpc_port}")


@pytest.fixture(scope="session")
def deploy_app(serve_instance: ServeEndpoints):
    """Deploy one more application on the session's Serve: `deploy_app(name, route_prefix, AppConfig)`."""
    return lambda name, prefix, config: _deploy(serve_instance, name, prefix, config)


@pytest.fixture(scope="session")
def served_app(serve_instance: ServeEndpoints, engine_config: EngineConfig, model_dirs: ModelDirs) -> ServedApp:
    config = AppConfig(engine=engine_config, chat_template=_chat_template(model_dirs), model_server_num_cpus=0.5,
                       router_num_cpus=0.25)
    return _deploy(serve_instance, "dspark", "/", config)


@pytest.fixture(scope="session")
def colocated_app(serve_instance: ServeEndpoints, served_app: ServedApp) -> ServedApp:
    """`served_app`'s configuration with the router inside the model-server replica."""
    config = served_app.config.model_copy(update={"colocate_router": True})
    return _deploy(serve_instance, "colocated", "/colocated", config)


@pytest.fixture(params=["served_app", "colocated_app"])
def any_app(request) -> ServedApp:
    """The main app, then the same with its router colocated."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tiny_app(serve_instance: ServeEndpoints, engine_config: EngineConfig) -> ServedApp:
    """One request decoding, one queued, the next rejected; API keys required."""
    config = AppConfig(
        model_name="tiny", engine=engine_config.model_copy(update={"max_batch_size": 1}),
        max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2, model_server_num_cpus=0.5,
        router_num_cpus=0.25,
        tenants=[{"name": "alice", "api_key": ALICE_KEY}, {"name": "bob", "api_key": BOB_KEY, "max_ongoing_requests": 1}])
    return _deploy(serve_instance, "tiny", "/tiny", config)


@dataclass(frozen=True)
class TargetOnly:
    """The oracle: the in-process engine with drafter none (target-only greedy)."""

    tokenizer: object
    engine: object
    cache: dict

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        from dspark_ray.engine.sequence import GenerationRequest

        key = (tuple(prompt_ids), max_tokens)
        if key not in self.cache:
            (seq,) = self.engine.generate([GenerationRequest(list(prompt_ids), max_tokens=max_tokens)])
            self.cache[key] = list(seq.output_token_ids)
        return self.cache[key]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


@pytest.fixture(scope="session")
def target_only(engine_config: EngineConfig) -> TargetOnly:
    import torch

    from dspark_ray.engine.factory import build_engine, load_models

    torch.set_num_threads(1)  # two shared cores: leave the other one to the Serve replicas
    config = engine_config.model_copy(update={"drafter": "none"})
    models = load_models(config)
    return TargetOnly(models.tokenizer, build_engine(config, models), {})
