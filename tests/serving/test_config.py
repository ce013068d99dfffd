"""Serving configuration: one Serve config file format for `dspark-ray serve`, `serve deploy` and
KubeRay; deployment options derived from it; the CLI flags. No Ray cluster needed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dspark_ray.cli import build_parser
from dspark_ray.serving.app import (SAME_LOOP_ENV_VARS, build_app, colocated_options, model_server_options,
                                    router_options)
from dspark_ray.serving.config import GRPC_SERVICER_FUNCTION, IMPORT_PATH, AppConfig, ServeConfig
from dspark_ray.serving.serve_cli import (HIGH_THROUGHPUT_ENV_VARS, router_serves_http, serve_config_from_args,
                                          serve_env_vars)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def rayservice() -> dict:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


def test_serve_config_file_reads_with_bundled_defaults() -> None:
    config = ServeConfig.from_file(DEPLOY / "serve_config.yaml")
    assert config.base_url == "http://127.0.0.1:8000/v1" and config.grpc_port == 9000
    assert config.app.engine.device == "cpu" and config.app.workers.mode == "local"
    assert config.app.engine.target.name == "target"  # the bundled model directory
    assert config.proxy_request_timeout_s >= config.app.request_timeout_s


def test_rayservice_embeds_a_serve_config_for_tensor_parallel_workers() -> None:
    manifest = rayservice()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    config = ServeConfig.from_serve_dict(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    workers, placement = config.app.workers, config.app.workers.placement
    assert workers.mode == "distributed" and placement.tp == 2 and placement.resolved_backend == "nccl"
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpus_per_target_pod = int(groups["target-tp2"]["rayStartParams"]["num-gpus"])
    assert gpus_per_target_pod >= placement.tp * placement.target_num_gpus_per_rank
    assert "dspark_draft" in groups["draft"]["rayStartParams"]["resources"]
    assert set(placement.draft_bundle) == {"GPU", "dspark_draft"}
    assert config.http_host == "0.0.0.0"


def test_rayservice_runs_serve_in_high_throughput_mode_on_every_pod() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert {e["name"]: e["value"] for e in container["env"]} == HIGH_THROUGHPUT_ENV_VARS


def restated_defaults(args: dict, defaults: dict, path: str = "") -> list[str]:
    """The fields of `args` set to their default value (nested blocks compared field by field)."""
    found = []
    for key, value in args.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            found += restated_defaults(value, default, f"{path}{key}.")
        elif value == default:
            found.append(f"{path}{key}")
    return found


def test_example_files_restate_no_default() -> None:
    """The example configs list only what differs from the defaults, so they cannot drift from them."""
    defaults = AppConfig().model_dump(mode="json")
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"][0]["args"]
    cluster = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert restated_defaults(local, defaults) == [] and restated_defaults(cluster, defaults) == []
    assert restated_defaults({"engine": {"drafter": "model", "device": "cuda"}}, defaults) == ["engine.drafter"]


def test_round_trip_through_a_serve_config() -> None:
    config = ServeConfig(http_port=8123, app=AppConfig(model_name="m", tenants=[{"name": "a", "api_key": "k" * 12}]))
    raw = config.to_serve_dict()
    assert raw["applications"][0]["import_path"] == IMPORT_PATH
    assert raw["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER_FUNCTION]
    assert ServeConfig.from_serve_dict(raw) == config


def test_unknown_app_args_are_rejected() -> None:
    raw = ServeConfig().to_serve_dict()
    raw["applications"][0]["args"] = {"enigne": {"drafter": "none"}}
    with pytest.raises(ValidationError, match="enigne"):
        ServeConfig.from_serve_dict(raw)


@pytest.mark.parametrize("args", [
    {"max_ongoing_requests": 0},
    {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
    {"workers": {"placement": {"tp": 2}}},  # TP runs on worker actors: mode distributed
    {"workers": {"mode": "distributed", "placement": {"tp_size": 2}}},
    {"tenants": [{"name": "a", "api_key": "same-key-1"}, {"name": "b", "api_key": "same-key-1"}]},
    {"over_capacity_status": 500},
    {"workers": {"engine_cpus": []}},
    {"workers": {"engine_cpus": [-1]}},
    {"workers": {"engine_process": False, "engine_cpus": [0]}},  # only an engine process is pinned
    {"workers": {"mode": "distributed", "engine_cpus": [0]}},
])
def test_invalid_app_configs(args: dict) -> None:
    with pytest.raises(ValidationError):
        AppConfig.model_validate(args)


def test_proxy_timeout_must_not_undercut_the_app_deadline() -> None:
    with pytest.raises(ValidationError, match="request_timeout_s"):
        ServeConfig(proxy_request_timeout_s=10, app=AppConfig(request_timeout_s=60))


def test_deployment_options() -> None:
    local = AppConfig(max_ongoing_requests=8, max_queued_requests=4)
    assert model_server_options(local)["num_replicas"] == 1
    assert "placement_group_bundles" not in model_server_options(local)
    assert router_options(local)["max_ongoing_requests"] >= 8 + 4
    assert local.router_admission_limit == 8 + 4  # the router admits; Serve's handle queue never refuses
    assert model_server_options(local)["max_queued_requests"] == -1
    scaled = AppConfig(autoscaling={"min_replicas": 1, "max_replicas": 3})
    assert model_server_options(scaled)["autoscaling_config"]["max_replicas"] == 3
    distributed = AppConfig(workers={"mode": "distributed", "placement": {"tp": 2}}, model_server_num_gpus=1)
    options = model_server_options(distributed)
    assert "placement_group_bundles" not in options  # the replica reserves its workers itself
    assert options["ray_actor_options"]["num_cpus"] == 1.0  # and coordinates only
    assert "num_gpus" not in options["ray_actor_options"]
    for deployment_options in (options, model_server_options(local), router_options(local)):
        # no blocking calls on these replicas' event loops: Serve may run them on its main loop
        assert deployment_options["ray_actor_options"]["runtime_env"]["env_vars"] == SAME_LOOP_ENV_VARS


def test_build_app_binds_router_to_model_server() -> None:
    app = build_app({"model_name": "m"})
    router = app._bound_deployment
    assert router.name == "Router"
    model_server = router.init_args[0]._bound_deployment
    assert model_server.name == "ModelServer"
    assert model_server.init_args[0].model_name == "m"


@pytest.mark.parametrize("colocate_router", [False, True])
@pytest.mark.parametrize(("http_host", "tenants", "loopback_only", "warned"), [
    ("127.0.0.1", (), True, False),  # local development: no key, callers on this machine only
    ("0.0.0.0", (), False, True),
    ("0.0.0.0", ({"name": "a", "api_key": "a-key-of-8"},), False, False),
])
def test_the_grpc_ingress_admits_whom_http_admits(monkeypatch, caplog, colocate_router: bool, http_host: str,
                                                  tenants: tuple, loopback_only: bool, warned: bool) -> None:
    """Serve's gRPC proxy binds every interface: the router is told whether HTTP binds loopback only."""
    monkeypatch.setattr("dspark_ray.serving.app.serve_http_host", lambda: http_host)
    router = build_app(AppConfig(model_name="m", colocate_router=colocate_router, tenants=tenants))._bound_deployment
    assert router.init_args[-1] is loopback_only
    assert ("no tenants are configured" in caplog.text) is warned
    assert ServeConfig(http_host=http_host).http_options()["host"] == http_host  # what serve.start binds


def test_colocated_router_is_one_deployment_with_the_model_servers_resources() -> None:
    config = AppConfig(model_name="m", colocate_router=True, max_ongoing_requests=8, max_queued_requests=4,
                       model_server_num_gpus=1, autoscaling={"min_replicas": 1, "max_replicas": 3})
    app = build_app(config)._bound_deployment
    assert app.name == "Router" and app.init_args[0] == config  # no handle: the model is in the replica
    options = colocated_options(config)
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["autoscaling_config"]["max_replicas"] == 3
    assert options["max_ongoing_requests"] >= 8 + 4 and "max_queued_requests" not in options
    assert options["ray_actor_options"]["runtime_env"]["env_vars"] == SAME_LOOP_ENV_VARS


def test_colocate_router_flags() -> None:
    assert serve_config_from_args(_serve_args()).app.colocate_router is False
    assert serve_config_from_args(_serve_args("--colocate-router")).app.colocate_router is True
    bench = build_parser().parse_args(["bench", "serve", "--launch", "--colocate-router", "--baseline", "other-router"])
    assert bench.colocate_router is True and bench.baseline == "other-router"


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_flags() -> None:
    config = serve_config_from_args(_serve_args())
    assert config.base_url == "http://127.0.0.1:8000/v1" and config.app.workers.mode == "local"
    config = serve_config_from_args(_serve_args("--tp", "2", "--drafter", "ngram", "--port", "8100",
                                                "--grpc-port", "0"))
    assert config.app.workers.mode == "distributed" and config.app.workers.placement.tp == 2
    assert config.app.engine.drafter == "ngram" and config.http_port == 8100 and config.grpc_port is None
    assert config.app.max_request_body_bytes == AppConfig().max_request_body_bytes
    config = serve_config_from_args(_serve_args("--max-request-body-bytes", "65536"))
    assert config.app.max_request_body_bytes == 65536


def test_high_throughput_flag() -> None:
    assert _serve_args().high_throughput is True
    assert _serve_args("--no-high-throughput").high_throughput is False
    assert _serve_args().haproxy is False and _serve_args("--haproxy").haproxy is True
    bench = build_parser().parse_args(["bench", "serve", "--launch", "--no-high-throughput"])
    assert bench.high_throughput is False


def test_a_single_router_replica_serves_the_http_port_itself() -> None:
    """Serve's direct ingress, one port wide: no hop through Serve's proxy on a fresh local cluster."""
    one, two = AppConfig(), AppConfig(router_replicas=2)
    assert router_serves_http(one, high_throughput=True, haproxy=False)
    assert not router_serves_http(two, high_throughput=True, haproxy=False)  # needs a balancer
    assert not router_serves_http(one, high_throughput=False, haproxy=False)  # no direct ingress
    assert not router_serves_http(one, high_throughput=True, haproxy=True)  # HAProxy takes the port
    colocated = {"colocate_router": True}
    assert router_serves_http(AppConfig(**colocated), high_throughput=True, haproxy=False)
    scaled = AppConfig(**colocated, autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert not router_serves_http(scaled, high_throughput=True, haproxy=False)
    env = serve_env_vars(router_http_port=8123)
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8123", "8124")  # Serve allocates from range(min, max)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in serve_env_vars()


def test_serve_config_file_with_port_override() -> None:
    config = serve_config_from_args(_serve_args("--config", str(DEPLOY / "serve_config.yaml"), "--port", "8200"))
    assert config.http_port == 8200 and config.app.model_name == "dspark-reference"


def test_engine_process_flags() -> None:
    app = serve_config_from_args(_serve_args()).app
    assert app.workers.engine_process is True and app.workers.engine_cpus is None
    assert app.torch_num_threads == 1  # as `--threads` says: 1 per engine unless set
    assert serve_config_from_args(_serve_args("--threads", "2")).app.torch_num_threads == 2
    workers = serve_config_from_args(_serve_args("--no-engine-process")).app.workers
    assert workers.engine_process is False
    workers = serve_config_from_args(_serve_args("--engine-cpus", "0,3")).app.workers
    assert workers.engine_cpus == (0, 3)
    bench = build_parser().parse_args(["bench", "serve", "--launch", "--engine-cpus", "1"])
    assert bench.engine_cpus == (1,) and bench.engine_process is True
    with pytest.raises(SystemExit):
        _serve_args("--engine-cpus", "first")


def test_engine_stall_timeout_flag() -> None:
    assert serve_config_from_args(_serve_args()).app.engine_stall_timeout_s == 60.0
    assert serve_config_from_args(_serve_args("--engine-stall-timeout", "5")).app.engine_stall_timeout_s == 5.0
    with pytest.raises(ValidationError):
        serve_config_from_args(_serve_args("--engine-stall-timeout", "0"))
